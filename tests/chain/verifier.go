// An independent check of dlq-worker's hash chain, in Go with the standard library only:
// it mirrors the platform's AuditEvent struct, its hashing (PrepareEventForHashing, SHA-256
// or HMAC-SHA-256 of previous_event_hash || json.Marshal) and its verify-chain walk (rows of
// one correlation_id with a hash, by event_timestamp then event_id), so that what Go's
// encoding/json writes, not what Python thinks it writes, is the reference.
//
//	verifier vectors   < lines of JSON       → each line re-marshalled by encoding/json
//	verifier times     < lines of RFC 3339   → each time.Time as json.Marshal writes it
//	verifier hash      < {"previous","row"}  → the platform's hash of that stored row
//	verifier verify    < rows, one per line  → one report per correlation_id
//
// Rows are the audit_events columns as read back from PostgreSQL (NULL as null, jsonb as
// its text, timestamps as RFC 3339, dates as YYYY-MM-DD). VERIFIER_HMAC_KEY is the key.
package main

import (
	"bufio"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"time"
)

// DateOnly mirrors the platform's: a zero value marshals as null.
type DateOnly time.Time

func (d DateOnly) MarshalJSON() ([]byte, error) {
	t := time.Time(d)
	if t.IsZero() {
		return []byte("null"), nil
	}
	return []byte(fmt.Sprintf(`"%s"`, t.Format("2006-01-02"))), nil
}

// UUID holds the canonical lowercase text, which is what uuid.UUID marshals to.
type UUID string

// AuditEvent mirrors the platform's repository struct: field order and tags matter.
type AuditEvent struct {
	EventID           UUID                   `json:"event_id"`
	EventTimestamp    time.Time              `json:"event_timestamp"`
	EventDate         DateOnly               `json:"event_date"`
	EventType         string                 `json:"event_type"`
	Version           string                 `json:"version"`
	EventCategory     string                 `json:"event_category"`
	EventAction       string                 `json:"event_action"`
	EventOutcome      string                 `json:"event_outcome"`
	CorrelationID     string                 `json:"correlation_id"`
	ParentEventID     *UUID                  `json:"parent_event_id"`
	ParentEventDate   *time.Time             `json:"parent_event_date"`
	ResourceType      string                 `json:"resource_type,omitempty"`
	ResourceID        string                 `json:"resource_id,omitempty"`
	ResourceNamespace string                 `json:"namespace,omitempty"`
	ClusterID         string                 `json:"cluster_name,omitempty"`
	Severity          string                 `json:"severity,omitempty"`
	DurationMs        int                    `json:"duration_ms,omitempty"`
	ErrorCode         string                 `json:"error_code,omitempty"`
	ErrorMessage      string                 `json:"error_message,omitempty"`
	ActorID           string                 `json:"actor_id,omitempty"`
	ActorType         string                 `json:"actor_type,omitempty"`
	ActorIP           string                 `json:"actor_ip,omitempty"`
	RetentionDays     int                    `json:"retention_days"`
	IsSensitive       bool                   `json:"is_sensitive"`
	EventHash         string                 `json:"event_hash"`
	PreviousEventHash string                 `json:"previous_event_hash"`
	HashAlgorithm     string                 `json:"hash_algorithm,omitempty"`
	LegalHold         bool                   `json:"legal_hold"`
	LegalHoldReason   string                 `json:"legal_hold_reason"`
	LegalHoldPlacedBy string                 `json:"legal_hold_placed_by"`
	LegalHoldPlacedAt *time.Time             `json:"legal_hold_placed_at"`
	EventData         map[string]interface{} `json:"event_data"`
}

// Row is one audit_events row as exported by the tests.
type Row struct {
	EventID           string  `json:"event_id"`
	EventTimestamp    string  `json:"event_timestamp"`
	EventType         string  `json:"event_type"`
	EventVersion      string  `json:"event_version"`
	EventCategory     string  `json:"event_category"`
	EventAction       string  `json:"event_action"`
	EventOutcome      string  `json:"event_outcome"`
	CorrelationID     string  `json:"correlation_id"`
	ParentEventID     *string `json:"parent_event_id"`
	ParentEventDate   *string `json:"parent_event_date"`
	ResourceType      string  `json:"resource_type"`
	ResourceID        string  `json:"resource_id"`
	Namespace         *string `json:"namespace"`
	ClusterID         *string `json:"cluster_id"`
	ActorID           string  `json:"actor_id"`
	ActorType         string  `json:"actor_type"`
	ActorIP           *string `json:"actor_ip"`
	Severity          *string `json:"severity"`
	DurationMs        *int    `json:"duration_ms"`
	ErrorCode         *string `json:"error_code"`
	ErrorMessage      *string `json:"error_message"`
	RetentionDays     int     `json:"retention_days"`
	IsSensitive       bool    `json:"is_sensitive"`
	EventData         string  `json:"event_data"`
	EventHash         *string `json:"event_hash"`
	PreviousEventHash *string `json:"previous_event_hash"`
	HashAlgorithm     string  `json:"hash_algorithm"`
}

func str(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// event rebuilds the struct from a row as the platform's verify handler does.
func event(r Row) (AuditEvent, error) {
	ts, err := time.Parse(time.RFC3339Nano, r.EventTimestamp)
	if err != nil {
		return AuditEvent{}, err
	}
	e := AuditEvent{
		EventID: UUID(r.EventID), EventTimestamp: ts.UTC(), EventType: r.EventType,
		Version: r.EventVersion, EventCategory: r.EventCategory, EventAction: r.EventAction,
		EventOutcome: r.EventOutcome, CorrelationID: r.CorrelationID,
		ResourceType: r.ResourceType, ResourceID: r.ResourceID,
		ResourceNamespace: str(r.Namespace), ClusterID: str(r.ClusterID),
		ActorID: r.ActorID, ActorType: r.ActorType, ActorIP: str(r.ActorIP),
		Severity: str(r.Severity), ErrorCode: str(r.ErrorCode), ErrorMessage: str(r.ErrorMessage),
		RetentionDays: r.RetentionDays, IsSensitive: r.IsSensitive,
		EventHash: str(r.EventHash), PreviousEventHash: str(r.PreviousEventHash),
		HashAlgorithm: r.HashAlgorithm,
	}
	if r.DurationMs != nil {
		e.DurationMs = *r.DurationMs
	}
	if r.ParentEventID != nil {
		id := UUID(*r.ParentEventID)
		e.ParentEventID = &id
	}
	if r.ParentEventDate != nil {
		d, err := time.Parse("2006-01-02", *r.ParentEventDate)
		if err != nil {
			return AuditEvent{}, err
		}
		e.ParentEventDate = &d
	}
	if r.EventData != "" {
		if err := json.Unmarshal([]byte(r.EventData), &e.EventData); err != nil {
			return AuditEvent{}, err
		}
	}
	return e, nil
}

// prepare zeroes what the platform excludes from the hash (PrepareEventForHashing).
func prepare(e AuditEvent) AuditEvent {
	e.EventHash, e.PreviousEventHash, e.HashAlgorithm = "", "", ""
	e.EventDate = DateOnly{}
	e.LegalHold, e.LegalHoldReason, e.LegalHoldPlacedBy, e.LegalHoldPlacedAt = false, "", "", nil
	return e
}

func hash(key []byte, algorithm, previous string, e AuditEvent) (string, error) {
	payload, err := json.Marshal(prepare(e))
	if err != nil {
		return "", err
	}
	switch algorithm {
	case "hmac-sha256":
		if len(key) == 0 {
			return "", fmt.Errorf("event %s is hmac-sha256 but no key is set", e.EventID)
		}
		mac := hmac.New(sha256.New, key)
		mac.Write([]byte(previous))
		mac.Write(payload)
		return hex.EncodeToString(mac.Sum(nil)), nil
	case "sha256-unkeyed", "":
		h := sha256.New()
		h.Write([]byte(previous))
		h.Write(payload)
		return hex.EncodeToString(h.Sum(nil)), nil
	}
	return "", fmt.Errorf("event %s has unrecognized hash_algorithm %q", e.EventID, algorithm)
}

type Tampered struct {
	EventID string `json:"event_id"`
	Message string `json:"message"`
}

type Report struct {
	CorrelationID   string     `json:"correlation_id"`
	Valid           bool       `json:"is_valid"`
	TotalEvents     int        `json:"total_events"`
	VerifiedEvents  int        `json:"verified_events"`
	SkippedNullHash int        `json:"skipped_null_hash"`
	Tampered        []Tampered `json:"tampered_events"`
}

// verify walks each correlation_id's hashed rows by (event_timestamp, event_id), as the
// platform's verifyEventChain does: a running previous hash, two checks per row.
func verify(rows []Row, key []byte) ([]Report, error) {
	byChain := map[string][]AuditEvent{}
	skipped := map[string]int{}
	for _, r := range rows {
		if r.EventHash == nil {
			skipped[r.CorrelationID]++
			if _, ok := byChain[r.CorrelationID]; !ok {
				byChain[r.CorrelationID] = nil
			}
			continue
		}
		e, err := event(r)
		if err != nil {
			return nil, err
		}
		byChain[r.CorrelationID] = append(byChain[r.CorrelationID], e)
	}
	ids := make([]string, 0, len(byChain))
	for id := range byChain {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	reports := []Report{}
	for _, id := range ids {
		events := byChain[id]
		sort.Slice(events, func(i, j int) bool {
			if !events[i].EventTimestamp.Equal(events[j].EventTimestamp) {
				return events[i].EventTimestamp.Before(events[j].EventTimestamp)
			}
			return events[i].EventID < events[j].EventID
		})
		rep := Report{CorrelationID: id, Valid: true, TotalEvents: len(events),
			SkippedNullHash: skipped[id], Tampered: []Tampered{}}
		previous := ""
		for _, e := range events {
			expected, err := hash(key, e.HashAlgorithm, previous, e)
			if err != nil {
				return nil, err
			}
			if e.PreviousEventHash != previous {
				rep.Valid = false
				rep.Tampered = append(rep.Tampered, Tampered{string(e.EventID),
					"Previous hash mismatch: event claims different previous_event_hash"})
			}
			if e.EventHash != expected {
				rep.Valid = false
				rep.Tampered = append(rep.Tampered, Tampered{string(e.EventID),
					"Event hash mismatch: event data has been tampered"})
			} else {
				rep.VerifiedEvents++
			}
			previous = e.EventHash
		}
		reports = append(reports, rep)
	}
	return reports, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: verifier vectors|times|hash|verify")
		os.Exit(2)
	}
	key := []byte(os.Getenv("VERIFIER_HMAC_KEY"))
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	fail := func(err error) {
		out.Flush()
		fmt.Fprintln(os.Stderr, "verifier:", err)
		os.Exit(1)
	}
	switch os.Args[1] {
	case "vectors":
		for in.Scan() {
			var v interface{}
			if err := json.Unmarshal(in.Bytes(), &v); err != nil {
				fmt.Fprintf(out, "ERROR %v\n", err)
				continue
			}
			b, err := json.Marshal(v)
			if err != nil {
				fmt.Fprintf(out, "ERROR %v\n", err)
				continue
			}
			out.Write(b)
			out.WriteString("\n")
		}
	case "times":
		for in.Scan() {
			t, err := time.Parse(time.RFC3339Nano, in.Text())
			if err != nil {
				fmt.Fprintf(out, "ERROR %v\n", err)
				continue
			}
			b, _ := json.Marshal(t.UTC())
			out.Write(b)
			out.WriteString("\n")
		}
	case "hash":
		for in.Scan() {
			var req struct {
				Previous  string `json:"previous"`
				Algorithm string `json:"algorithm"`
				Row       Row    `json:"row"`
			}
			if err := json.Unmarshal(in.Bytes(), &req); err != nil {
				fail(err)
			}
			e, err := event(req.Row)
			if err != nil {
				fail(err)
			}
			h, err := hash(key, req.Algorithm, req.Previous, e)
			if err != nil {
				fail(err)
			}
			fmt.Fprintln(out, h)
		}
	case "verify":
		var rows []Row
		for in.Scan() {
			var r Row
			if err := json.Unmarshal(in.Bytes(), &r); err != nil {
				fail(err)
			}
			rows = append(rows, r)
		}
		reports, err := verify(rows, key)
		if err != nil {
			fail(err)
		}
		b, _ := json.Marshal(reports)
		out.Write(b)
		out.WriteString("\n")
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
