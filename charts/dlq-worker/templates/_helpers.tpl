{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "dlq-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "dlq-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dlq-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of the release. */}}
{{- define "dlq-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dlq-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "dlq-worker.labels" -}}
helm.sh/chart: {{ include "dlq-worker.chart" . }}
{{ include "dlq-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/part-of: audit
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dlq-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dlq-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the passwords, or "" when there is none. */}}
{{- define "dlq-worker.secretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if or .Values.auth.redisPassword .Values.auth.databasePassword }}
{{- include "dlq-worker.fullname" . }}
{{- end }}
{{- end }}

{{/* worker.yaml: the chart's settings first, then .Values.config (later wins). */}}
{{- define "dlq-worker.config" -}}
{{- $base := dict
  "redis" (dict "addr" .Values.redis.addr "db" .Values.redis.db "username" .Values.redis.username "tls" .Values.redis.tls)
  "database" (dict "host" .Values.database.host "port" .Values.database.port "name" .Values.database.name "user" .Values.database.user "sslmode" .Values.database.sslmode)
  "worker" (dict "shutdown_timeout" .Values.shutdownTimeoutSeconds)
  "http" (dict "host" "0.0.0.0" "port" .Values.containerPort)
  "log" (dict "format" "json")
}}
{{- $merged := mustMergeOverwrite $base (deepCopy .Values.config) }}
{{- toYaml $merged }}
{{- end }}

{{/* Redis host:port for KEDA (no scheme). */}}
{{- define "dlq-worker.redisAddress" -}}
{{- regexReplaceAll "^rediss?://" .Values.redis.addr "" }}
{{- end }}
