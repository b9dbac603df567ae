{{- define "pa.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pa.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pa.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "pa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels; "component" tells the main and retry Deployments apart. */}}
{{- define "pa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pa.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pa.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "pa.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-secret" (include "pa.fullname" .)) -}}
{{- end -}}

{{/* The migration hook runs before regular resources exist: it reads migrations.job.existingSecret,
else a hook Secret of its own (the owner's migrations.job.databaseUrl, or database.url), else
existingSecret when no owner URL is given. */}}
{{- define "pa.migrationSecretName" -}}
{{- $job := .Values.migrations.job -}}
{{- if $job.existingSecret -}}
{{- $job.existingSecret -}}
{{- else if and .Values.existingSecret (not $job.databaseUrl) -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- printf "%s-migrate" (include "pa.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "pa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "pa.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* The partition count caps every autoscaler: more members than partitions sit idle. */}}
{{- define "pa.maxReplicas" -}}
{{- min .max .root.Values.kafka.partitions -}}
{{- end -}}

{{/* Pod spec shared by the main and retry Deployments. Args: root, role, resources. */}}
{{- define "pa.podSpec" -}}
serviceAccountName: {{ include "pa.serviceAccountName" .root }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
# Longer than the agent's drain deadline (SHUTDOWN_TIMEOUT), so SIGTERM finishes in-flight
# transactions and commits offsets before the kubelet kills the container. No preStop hook is
# needed: the pod takes no traffic through a Service, and SIGTERM itself starts the drain.
terminationGracePeriodSeconds: {{ add .root.Values.config.shutdownTimeoutSeconds 15 }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: agent
    image: {{ include "pa.image" .root }}
    imagePullPolicy: {{ .root.Values.image.pullPolicy }}
    args: ["run"]
    env:
      - name: AGENT_ROLE
        value: {{ .role }}
      {{- include "pa.secretFileEnv" .root | nindent 6 }}
    envFrom:
      - configMapRef:
          name: {{ include "pa.fullname" .root }}
    # Secrets are files (the Kubernetes convention): never in the environment, where a crash
    # dump or `kubectl describe` of a child process could show them.
    volumeMounts:
      - name: secrets
        mountPath: /etc/persistence-agent/secrets
        readOnly: true
    ports:
      - name: http
        containerPort: 8080
    # Start-up (migrations, topic creation) may take a while before /healthz answers.
    startupProbe:
      httpGet:
        path: /healthz
        port: http
      periodSeconds: 5
      failureThreshold: 30
    livenessProbe:
      httpGet:
        path: /healthz
        port: http
      periodSeconds: 10
      failureThreshold: 3
    # Not ready while joining the group, during a database outage and while draining.
    readinessProbe:
      httpGet:
        path: /readyz
        port: http
      periodSeconds: 5
      failureThreshold: 2
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- toYaml .root.Values.securityContext | nindent 6 }}
volumes:
  - name: secrets
    secret:
      secretName: {{ include "pa.secretName" .root }}
      defaultMode: 0440
{{- with .root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}


{{/* The *_FILE variables naming the mounted Secret's keys: DATABASE_URL and each secret
librdkafka setting (kafkaSecretConfig, or existingSecretKafkaKeys of an existing Secret). */}}
{{- define "pa.secretFileEnv" -}}
- name: DATABASE_URL_FILE
  value: /etc/persistence-agent/secrets/DATABASE_URL
{{- $keys := concat (keys .Values.kafkaSecretConfig | sortAlpha) .Values.existingSecretKafkaKeys }}
{{- range $keys }}
- name: KAFKA_CONFIG_{{ . }}_FILE
  value: /etc/persistence-agent/secrets/KAFKA_CONFIG_{{ . }}
{{- end }}
{{- end -}}
