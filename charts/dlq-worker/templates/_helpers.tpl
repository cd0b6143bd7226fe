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
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The image: by digest when one is given, else by tag. */}}
{{- define "dlq-worker.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/* The worker container's env, shared by the Deployment and the `helm test` Pod. */}}
{{- define "dlq-worker.env" -}}
{{- $secret := include "dlq-worker.secretName" . }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if and $secret .Values.auth.redisPasswordKey }}
- name: REDIS_PASSWORD_FILE
  value: /etc/dlq-worker/secrets/{{ .Values.auth.redisPasswordKey }}
{{- end }}
{{- if and $secret .Values.auth.databasePasswordKey }}
- name: DB_PASSWORD_FILE
  value: /etc/dlq-worker/secrets/{{ .Values.auth.databasePasswordKey }}
{{- end }}
{{- if and .Values.auth.existingSecret .Values.auth.hashChainKeyKey }}
- name: DLQ_WORKER_DATABASE_HASH_CHAIN_KEY_FILE
  value: /etc/dlq-worker/secrets/{{ .Values.auth.hashChainKeyKey }}
{{- end }}
{{- if .Values.platformConfig.configMapName }}
- name: DLQ_WORKER_PLATFORM_CONFIG
  value: /etc/dlq-worker/platform/{{ .Values.platformConfig.key }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The worker container's volume mounts. */}}
{{- define "dlq-worker.volumeMounts" -}}
- name: config
  mountPath: /etc/dlq-worker/worker.yaml
  subPath: worker.yaml
  readOnly: true
{{- if include "dlq-worker.secretName" . }}
- name: secrets
  mountPath: /etc/dlq-worker/secrets
  readOnly: true
{{- end }}
{{- if .Values.platformConfig.configMapName }}
- name: platform-config
  mountPath: /etc/dlq-worker/platform
  readOnly: true
{{- range $i, $s := .Values.platformConfig.secrets }}
- name: platform-secret-{{ $i }}
  mountPath: {{ $s.mountPath }}
  readOnly: true
{{- end }}
{{- end }}
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pod's volumes. */}}
{{- define "dlq-worker.volumes" -}}
{{- $secret := include "dlq-worker.secretName" . }}
- name: config
  configMap:
    name: {{ include "dlq-worker.fullname" . }}
{{- if $secret }}
- name: secrets
  secret:
    secretName: {{ $secret }}
    defaultMode: 0400
{{- end }}
{{- if .Values.platformConfig.configMapName }}
- name: platform-config
  configMap:
    name: {{ .Values.platformConfig.configMapName }}
    items:
      - key: {{ .Values.platformConfig.key }}
        path: {{ .Values.platformConfig.key }}
{{- range $i, $s := .Values.platformConfig.secrets }}
- name: platform-secret-{{ $i }}
  secret:
    secretName: {{ $s.secretName }}
    defaultMode: 0400
{{- end }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 16Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Every routed DLQ stream (config.streams.routes, else the worker's defaults). */}}
{{- define "dlq-worker.routedStreams" -}}
{{- $prefix := dig "streams" "prefix" "audit:dlq:" .Values.config }}
{{- $defaults := dict "events" "audit_events" "notifications" "notification_audit" "notification" "notification_audit" }}
{{- $routes := dig "streams" "routes" $defaults .Values.config }}
{{- range $name := keys $routes | sortAlpha }}
- {{ printf "%s%s" $prefix $name | quote }}
{{- end }}
{{- end }}

{{/* The Redis port (from redis.addr; 6379 when it names none). */}}
{{- define "dlq-worker.redisPort" -}}
{{- $found := regexFind ":[0-9]+$" (include "dlq-worker.redisAddress" .) }}
{{- if $found }}{{ trimPrefix ":" $found }}{{ else }}6379{{ end }}
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
  "worker" (dict "shutdown_timeout" .Values.shutdownTimeoutSeconds)
  "http" (dict "host" "0.0.0.0" "port" .Values.containerPort)
  "log" (dict "format" "json")
}}
{{- /* Beside the platform, its own file says where Redis and PostgreSQL are (worker.yaml
would win over it): only what .Values.config sets explicitly is added. */}}
{{- if not .Values.platformConfig.configMapName }}
{{- $_ := set $base "redis" (dict "addr" .Values.redis.addr "db" .Values.redis.db "username" .Values.redis.username "tls" .Values.redis.tls) }}
{{- $_ := set $base "database" (dict "host" .Values.database.host "port" .Values.database.port "name" .Values.database.name "user" .Values.database.user "sslmode" .Values.database.sslmode) }}
{{- end }}
{{- $merged := mustMergeOverwrite $base (deepCopy .Values.config) }}
{{- toYaml $merged }}
{{- end }}

{{/* Redis host:port for KEDA (no scheme). */}}
{{- define "dlq-worker.redisAddress" -}}
{{- regexReplaceAll "^rediss?://" .Values.redis.addr "" }}
{{- end }}
