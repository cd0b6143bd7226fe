// An independent check of dlq-worker's hash chain, in Go with the standard library only:
// it mirrors the platform's AuditEvent struct, its hashing and its verify-chain walk, so
// that what Go's encoding/json writes, not what Python thinks it writes, is the reference.
//
//	verifier vectors   < lines of JSON      → each line re-marshalled by encoding/json
//	verifier times     < lines of RFC 3339  → each time.Time as json.Marshal writes it
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: verifier vectors|times")
		os.Exit(2)
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
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
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
