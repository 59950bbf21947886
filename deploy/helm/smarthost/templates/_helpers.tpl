{{/* Names are cut at 63 characters, the limit of a DNS label. */}}
{{- define "smarthost.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "smarthost.fullname" -}}
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

{{- define "smarthost.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smarthost.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "smarthost.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "smarthost.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "smarthost.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "smarthost.secretName" -}}
{{- .Values.secret.existingSecret | default (include "smarthost.fullname" .) }}
{{- end }}

{{- define "smarthost.tlsSecretName" -}}
{{- .Values.tls.secretName | default (printf "%s-tls" (include "smarthost.fullname" .)) }}
{{- end }}

{{/* Paths inside the pod. */}}
{{- define "smarthost.configDir" -}}/etc/smarthost/config{{- end }}
{{- define "smarthost.tlsDir" -}}/etc/smarthost/tls{{- end }}
{{- define "smarthost.dkimDir" -}}/etc/smarthost/dkim{{- end }}
{{- define "smarthost.queueDir" -}}/var/lib/smarthost{{- end }}
{{- define "smarthost.adminTokenEnv" -}}SMARTHOST_ADMIN_TOKEN{{- end }}
{{- define "smarthost.queueDSNEnv" -}}SMARTHOST_QUEUE_DSN{{- end }}

{{/*
smarthost.queueBackend returns queue.backend, "bbolt" or "postgres",
after refusing the values that would lose mail or break the promises of
rate_limit: several replicas each on its own bbolt file without the
operator saying they accept it, and postgres without a DSN.
*/}}
{{- define "smarthost.queueBackend" -}}
{{- $q := .Values.queue | default dict }}
{{- $backend := $q.backend | default "bbolt" | toString }}
{{- $replicas := int .Values.replicas }}
{{- if eq $backend "bbolt" }}
{{- if and (gt $replicas 1) (not (dig "bbolt" "acceptPerReplicaQueuesAndLimits" false $q)) }}
{{- fail (printf "replicas is %d with queue.backend bbolt: each replica would have its own queue, stranded when it is scaled down, and its own rate_limit windows, so an upstream's quota is multiplied by the replicas. Use queue.backend postgres (one queue shared by every replica), or set queue.bbolt.acceptPerReplicaQueuesAndLimits: true to accept this" $replicas) }}
{{- end }}
{{- else if eq $backend "postgres" }}
{{- if not (dig "postgres" "existingSecret" "" $q) }}
{{- fail "queue.backend postgres needs queue.postgres.existingSecret: the Secret that holds the database's connection string (a libpq DSN or URL) under queue.postgres.key" }}
{{- end }}
{{- if not (dig "postgres" "key" "" $q) }}
{{- fail "queue.backend postgres needs queue.postgres.key: the key of queue.postgres.existingSecret that holds the connection string" }}
{{- end }}
{{- else }}
{{- fail (printf "queue.backend %q: want bbolt or postgres" $backend) }}
{{- end }}
{{- $backend }}
{{- end }}

{{/*
smarthost.listeners returns settings.listen checked, as JSON: every
listener has a name usable as a port name, and ports.
*/}}
{{- define "smarthost.listeners" -}}
{{- $out := list }}
{{- range $i, $l := .Values.settings.listen }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]{0,13}[a-z0-9])?$" ($l.name | default "" | toString)) }}
{{- fail (printf "settings.listen[%d].name %q must be a port name: lower-case letters, digits and '-', at most 15" $i ($l.name | default "" | toString)) }}
{{- end }}
{{- if not (and $l.port $l.containerPort) }}
{{- fail (printf "settings.listen[%d] (%s) needs port (the Service's) and containerPort (the pod's)" $i $l.name) }}
{{- end }}
{{- if hasKey $l "address" }}
{{- fail (printf "settings.listen[%d].address is set by the chart from containerPort" $i) }}
{{- end }}
{{- $out = append $out $l }}
{{- end }}
{{- if not $out }}
{{- fail "settings.listen needs at least one listener" }}
{{- end }}
{{- if and (not .Values.config) (not .Values.settings.user) }}
{{- range $out }}
{{- if ne (.auth | default "required" | toString) "none" }}
{{- fail (printf "settings.listen %s requires AUTH and settings.user is empty: nobody could submit. Add a user (smarthost passwd makes its password_hash), or set auth: none with trusted_networks" .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* smarthost.needsTLS is "true" when a listener serves TLS. */}}
{{- define "smarthost.needsTLS" -}}
{{- $need := false }}
{{- range .Values.settings.listen }}
{{- if ne (.tls | default "starttls") "none" }}{{ $need = true }}{{ end }}
{{- end }}
{{- if or $need .Values.tls.secretName }}true{{ end }}
{{- end }}

{{/*
smarthost.tomlKeys writes the scalar and array entries of a map as TOML
key/value lines, name first, the others sorted. Values are written as
JSON, whose strings, numbers, booleans and arrays are also valid TOML.
*/}}
{{- define "smarthost.tomlKeys" -}}
{{- if hasKey . "name" }}
name = {{ toJson .name }}
{{- end }}
{{- range $k, $v := omit . "name" }}
{{ $k }} = {{ toJson $v }}
{{- end }}
{{- end }}

{{/* smarthost.config is the content of config.toml. */}}
{{- define "smarthost.config" -}}
{{- $backend := include "smarthost.queueBackend" . }}
{{- if .Values.config }}
{{- if not (contains (include "smarthost.adminTokenEnv" .) .Values.config) }}
{{- fail "config must set [http] admin_token_env = \"SMARTHOST_ADMIN_TOKEN\": the admin API listens beyond loopback in the pod" }}
{{- end }}
{{- if and (eq $backend "postgres") (not (contains (include "smarthost.queueDSNEnv" .) .Values.config)) }}
{{- fail "config must set [queue] backend = \"postgres\" and dsn_env = \"SMARTHOST_QUEUE_DSN\" with queue.backend postgres: the pod gets the DSN in that variable" }}
{{- end }}
{{- .Values.config }}
{{- else }}
{{- $s := .Values.settings }}
{{- if or (hasKey $s "http") (hasKey $s "tls") }}
{{- fail "settings.http and settings.tls are set by the chart (see http.port and tls.secretName)" }}
{{- end }}
{{- if hasKey ($s.queue | default dict) "path" }}
{{- fail "settings.queue.path is set by the chart: the queue lives on its volume" }}
{{- end }}
{{- range list "backend" "dsn_env" "dsn_file" }}
{{- if hasKey ($s.queue | default dict) . }}
{{- fail (printf "settings.queue.%s is set by the chart: see queue.backend and queue.postgres" .) }}
{{- end }}
{{- end -}}
# config.toml of smarthost, rendered by the Helm chart from its values.
{{- include "smarthost.tomlKeys" (omit $s "queue" "limits" "listen" "user" "upstream" "route" "dkim") }}

[queue]
{{- if eq $backend "postgres" }}
backend = "postgres"
dsn_env = {{ include "smarthost.queueDSNEnv" . | toJson }}
{{- else }}
path = {{ printf "%s/queue.db" (include "smarthost.queueDir" .) | toJson }}
{{- end }}
{{- include "smarthost.tomlKeys" ($s.queue | default dict) }}
{{- if include "smarthost.needsTLS" . }}

[tls]
cert_file = {{ printf "%s/tls.crt" (include "smarthost.tlsDir" .) | toJson }}
key_file = {{ printf "%s/tls.key" (include "smarthost.tlsDir" .) | toJson }}
{{- end }}
{{- with $s.limits }}

[limits]
{{- include "smarthost.tomlKeys" . }}
{{- end }}
{{- range (include "smarthost.listeners" . | fromJsonArray) }}

[[listen]]
address = {{ printf ":%d" (int .containerPort) | toJson }}
{{- include "smarthost.tomlKeys" (omit . "port" "containerPort") }}
{{- end }}
{{- range $s.user }}

[[user]]
{{- include "smarthost.tomlKeys" . }}
{{- end }}
{{- $dkimDir := include "smarthost.dkimDir" . }}
{{- range $s.dkim }}

[[dkim]]
{{- $keyFile := .key_file | default "" | toString }}
{{- if and $keyFile (not (hasPrefix "/" $keyFile)) }}
{{- if not $.Values.dkim.secretName }}
{{- fail (printf "settings.dkim key_file %q is a key of dkim.secretName, which is not set" $keyFile) }}
{{- end }}
{{- $keyFile = printf "%s/%s" $dkimDir $keyFile }}
{{- end }}
{{- include "smarthost.tomlKeys" (merge (dict "key_file" $keyFile) .) }}
{{- end }}
{{- range $i, $u := $s.upstream }}
{{- if and $u.password_env (not $.Values.secret.existingSecret) (not (hasKey $.Values.secret.env ($u.password_env | toString))) }}
{{- fail (printf "settings.upstream[%d].password_env %s is not a key of secret.env (nor is secret.existingSecret set)" $i $u.password_env) }}
{{- end }}

[[upstream]]
{{- include "smarthost.tomlKeys" . }}
{{- end }}
{{- range $s.route }}

[[route]]
{{- include "smarthost.tomlKeys" . }}
{{- end }}

[http]
address = {{ printf "0.0.0.0:%d" (int .Values.http.port) | toJson }}
admin_token_env = {{ include "smarthost.adminTokenEnv" . | toJson }}
{{ end }}
{{- end }}

{{/*
smarthost.upstreamPorts returns the upstream ports for the NetworkPolicy,
as JSON: networkPolicy.upstreamPorts, else those of settings.upstream, by
address or by provider.
*/}}
{{- define "smarthost.upstreamPorts" -}}
{{- $ports := list }}
{{- if .Values.networkPolicy.upstreamPorts }}
{{- range .Values.networkPolicy.upstreamPorts }}{{ $ports = append $ports (int .) }}{{ end }}
{{- else if not .Values.config }}
{{- /* The ports of the relay's provider profiles (relay/upstream/providers.go). */}}
{{- $providerPorts := dict "gmail" 465 "google-workspace-relay" 587 "yandex" 465 "mailru" 465 "yahoo" 465 "outlook365" 587 "ses" 587 "mailgun" 587 }}
{{- range .Values.settings.upstream }}
{{- $port := regexFind "[0-9]+$" (.address | default "" | toString) }}
{{- if $port }}{{ $ports = append $ports (atoi $port) }}
{{- else if and .provider (hasKey $providerPorts .provider) }}{{ $ports = append $ports (get $providerPorts .provider) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson ($ports | uniq) }}
{{- end }}
