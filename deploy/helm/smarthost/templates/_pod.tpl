{{/*
smarthost.podTemplate is the pod of the StatefulSet (bbolt: each pod its
own queue volume) or of the Deployment (postgres: the queue in the
database, no volume).
*/}}
{{- define "smarthost.podTemplate" -}}
{{- $listeners := include "smarthost.listeners" . | fromJsonArray }}
{{- $configPath := printf "%s/config.toml" (include "smarthost.configDir" .) }}
{{- $postgres := eq (include "smarthost.queueBackend" .) "postgres" -}}
metadata:
  labels:
    {{- include "smarthost.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # smarthost reads its configuration and environment at start, so
    # a change rolls the pods; certificates are reloaded in place.
    checksum/config: {{ include "smarthost.config" . | sha256sum }}
    checksum/secret: {{ toJson (list .Values.secret.existingSecret .Values.secret.adminToken .Values.secret.env) | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  # The relay never talks to the Kubernetes API, and its environment
  # is its configuration: no token, no service links.
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with .Values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: smarthost
      image: {{ include "smarthost.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve", "-config", {{ $configPath | quote }}]
      env:
        # For `kubectl exec … smarthost queue list`, which finds the
        # [http] address and token variable through the config.
        - name: SMARTHOST_CONFIG
          value: {{ $configPath | quote }}
        {{- $ownLimit := false }}
        {{- range .Values.extraEnv }}
        {{- if eq .name "GOMEMLIMIT" }}{{ $ownLimit = true }}{{ end }}
        {{- end }}
        {{- if and (dig "limits" "memory" "" .Values.resources) (not $ownLimit) }}
        # The Go runtime collects harder as it nears the container's
        # memory limit instead of letting garbage grow past it; what
        # the relay keeps live stays well under it (README, "Memory").
        - name: GOMEMLIMIT
          valueFrom:
            resourceFieldRef:
              resource: limits.memory
        {{- end }}
        {{- if $postgres }}
        # The queue's database: dsn_env in config.toml names this.
        - name: {{ include "smarthost.queueDSNEnv" . }}
          valueFrom:
            secretKeyRef:
              name: {{ .Values.queue.postgres.existingSecret }}
              key: {{ .Values.queue.postgres.key }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      envFrom:
        - secretRef:
            name: {{ include "smarthost.secretName" . }}
      ports:
        {{- range $listeners }}
        - name: {{ .name }}
          containerPort: {{ int .containerPort }}
          protocol: TCP
        {{- end }}
        - name: http
          containerPort: {{ int .Values.http.port }}
          protocol: TCP
      {{- with .Values.startupProbe }}
      startupProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ include "smarthost.configDir" . }}
          readOnly: true
        {{- if $postgres }}
        # Scratch space: the root filesystem is read-only.
        - name: tmp
          mountPath: /tmp
        {{- else }}
        - name: queue
          mountPath: {{ include "smarthost.queueDir" . }}
        {{- end }}
        {{- if include "smarthost.needsTLS" . }}
        - name: tls
          mountPath: {{ include "smarthost.tlsDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.dkim.secretName }}
        - name: dkim
          mountPath: {{ include "smarthost.dkimDir" . }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "smarthost.fullname" . }}
    {{- if include "smarthost.needsTLS" . }}
    - name: tls
      secret:
        secretName: {{ include "smarthost.tlsSecretName" . }}
        defaultMode: 0440
    {{- end }}
    {{- if .Values.dkim.secretName }}
    - name: dkim
      secret:
        secretName: {{ .Values.dkim.secretName }}
        defaultMode: 0440
    {{- end }}
    {{- if $postgres }}
    # The queue is in the database; nothing here outlives the pod.
    - name: tmp
      emptyDir: {}
    {{- else if not .Values.persistence.enabled }}
    # Without persistence the queue dies with the pod.
    - name: queue
      emptyDir: {}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
