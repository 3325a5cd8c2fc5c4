{{- define "sidecar.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sidecar.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sidecar.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sidecar.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "sidecar.dbSecret" -}}
{{- if .Values.postgresql.enabled -}}
{{ .Values.postgresql.existingSecret | default (printf "%s-db" (include "sidecar.fullname" .)) }}
{{- else -}}
{{ required "externalDatabase.existingSecret is required with postgresql.enabled=false" .Values.externalDatabase.existingSecret }}
{{- end -}}
{{- end -}}

{{- define "sidecar.dbPasswordKey" -}}
{{- if .Values.postgresql.enabled -}}password{{- else -}}{{ .Values.externalDatabase.passwordKey }}{{- end -}}
{{- end -}}

{{- define "sidecar.apiSecret" -}}
{{ .Values.api.existingSecret | default (printf "%s-api" (include "sidecar.fullname" .)) }}
{{- end -}}

{{/* The Secret holding the age identity, or "" when the key is not in the cluster */}}
{{- define "sidecar.identitySecret" -}}
{{- $id := .Values.backup.encryption.identity -}}
{{- if $id.existingSecret -}}{{ $id.existingSecret }}{{- else if $id.value -}}{{ printf "%s-age-identity" (include "sidecar.fullname" .) }}{{- end -}}
{{- end -}}

{{/* The Secret holding static S3 keys, or "" (no remote, or the cloud's workload identity / environment) */}}
{{- define "sidecar.remoteSecret" -}}
{{- $r := .Values.remote -}}
{{- if $r.url -}}
{{- if $r.existingSecret -}}{{ $r.existingSecret }}{{- else if $r.accessKeyId -}}{{ printf "%s-remote" (include "sidecar.fullname" .) }}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The dedicated replication role (wal.replication.user), or "" when the sidecar's own role replicates */}}
{{- define "sidecar.replicationUser" -}}
{{- if .Values.wal.enabled -}}{{ .Values.wal.replication.user }}{{- end -}}
{{- end -}}

{{/* The Secret holding the replication role's password (with wal.replication.user) */}}
{{- define "sidecar.replicationSecret" -}}
{{- $r := .Values.wal.replication -}}
{{- if include "sidecar.replicationUser" . -}}
{{- if $r.existingSecret -}}{{ $r.existingSecret }}{{- else if $r.password -}}{{ printf "%s-wal-replication" (include "sidecar.fullname" .) }}{{- end -}}
{{- end -}}
{{- end -}}

{{/* WAL_REPLICATION_URL: the database's server as the replication role, no password (a physical replication connection
names no database: "postgres" is only there to make a complete URL) */}}
{{- define "sidecar.replicationUrl" -}}
{{- if .Values.postgresql.enabled -}}
postgresql://{{ .Values.wal.replication.user }}@127.0.0.1:5432/postgres
{{- else -}}
postgresql://{{ .Values.wal.replication.user }}@{{ .Values.externalDatabase.host }}:{{ .Values.externalDatabase.port }}/postgres
{{- end -}}
{{- end -}}

{{- define "sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (include "sidecar.fullname" .) }}
{{- else -}}
{{ .Values.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{/* Pod-level settings the StatefulSet and the Deployment share */}}
{{- define "sidecar.podIdentity" -}}
{{- with include "sidecar.serviceAccountName" . }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- end -}}

{{- define "sidecar.backupsClaim" -}}
{{ .Values.backup.persistence.existingClaim | default (printf "%s-backups" (include "sidecar.fullname" .)) }}
{{- end -}}

{{- define "sidecar.databaseUrl" -}}
{{- if .Values.postgresql.enabled -}}
postgresql://{{ .Values.postgresql.username }}@127.0.0.1:5432/{{ .Values.postgresql.database }}
{{- else -}}
postgresql://{{ required "externalDatabase.username is required" .Values.externalDatabase.username }}@{{ required "externalDatabase.host is required" .Values.externalDatabase.host }}:{{ .Values.externalDatabase.port }}/{{ required "externalDatabase.database is required" .Values.externalDatabase.database }}
{{- end -}}
{{- end -}}

{{/* The restricted Pod Security Standard for the sidecar container */}}
{{- define "sidecar.containerSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sidecar.container" -}}
- name: backup-sidecar
  image: {{ include "sidecar.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run"]
  ports:
    - {name: http, containerPort: 9188, protocol: TCP}
  env:
    {{- include "sidecar.env" . | nindent 4 }}
  securityContext:
    {{- include "sidecar.containerSecurity" . | nindent 4 }}
  livenessProbe:
    httpGet: {path: /healthz, port: http}
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  {{- /*
  Readiness never depends on the database (/readyz does): beside PostgreSQL in one pod, a failing sidecar
  readiness would take PostgreSQL out of its Service for the sidecar's own trouble, so there is none there;
  alone (a Deployment) it is ready while its loop ticks. Database reachability is pg_backup_database_up and
  the PgBackupDatabaseUnreachable alert.
  */}}
  {{- if not .Values.postgresql.enabled }}
  readinessProbe:
    httpGet: {path: /healthz, port: http}
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  volumeMounts:
    {{- include "sidecar.mounts" . | nindent 4 }}
{{- end -}}

{{- define "sidecar.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.backup.persistence.enabled }}
- name: backups
  persistentVolumeClaim:
    claimName: {{ include "sidecar.backupsClaim" . }}
{{- else }}
{{- /* the sidecar's small state without a backups volume: the lock and its restore records (lost with the pod: the
backups themselves are in the remote store) */}}
- name: state
  emptyDir: {sizeLimit: 64Mi}
{{- end }}
- name: config
  configMap:
    name: {{ include "sidecar.fullname" . }}-config
- name: db-secret
  secret:
    secretName: {{ include "sidecar.dbSecret" . }}
    items: [{key: {{ include "sidecar.dbPasswordKey" . }}, path: password}]
- name: api-secret
  secret:
    secretName: {{ include "sidecar.apiSecret" . }}
    items: [{key: api-token, path: api-token}]
{{- with include "sidecar.identitySecret" . }}
- name: age-identity
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items: [{key: {{ $.Values.backup.encryption.identity.key | default "identity.txt" }}, path: identity.txt}]
{{- end }}
{{- with include "sidecar.replicationSecret" . }}
- name: wal-replication
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items: [{key: {{ ternary $.Values.wal.replication.passwordKey "password" (ne $.Values.wal.replication.existingSecret "") | quote }}, path: password}]
{{- end }}
{{- with include "sidecar.remoteSecret" . }}
{{- $keys := $.Values.remote.existingSecretKeys }}
- name: remote-credentials
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      {{- if $.Values.remote.existingSecret }}
      - {key: {{ $keys.accessKeyId | quote }}, path: access-key-id}
      - {key: {{ $keys.secretAccessKey | quote }}, path: secret-access-key}
      {{- with $keys.sessionToken }}
      - {key: {{ . | quote }}, path: session-token}
      {{- end }}
      {{- else }}
      - {key: access-key-id, path: access-key-id}
      - {key: secret-access-key, path: secret-access-key}
      {{- end }}
{{- end }}
{{- end -}}


{{/* postgres arguments for WAL streaming to the sidecar (bundled PostgreSQL, wal.enabled) */}}
{{- define "sidecar.walServerArgs" -}}
- -c
- wal_level=replica
- -c
- max_wal_senders={{ .Values.wal.maxWalSenders }}
- -c
- max_slot_wal_keep_size={{ .Values.wal.maxSlotWalKeepSize }}
- -c
- hba_file=/etc/postgresql/hba/pg_hba.conf
{{- if .Values.wal.synchronous }}
{{- /* RPO 0: the receiver's application_name is the slot's name; quoted, so that a name of digits is a name, not a count */}}
- -c
- synchronous_standby_names="{{ .Values.wal.slotName }}"
{{- end }}
{{- end -}}

{{/* The sidecar's environment: its container, and the bootstrap init container that restores with the same settings */}}
{{- define "sidecar.env" -}}
- {name: DATABASE_URL, value: {{ include "sidecar.databaseUrl" . | quote }}}
- {name: DATABASE_PASSWORD_FILE, value: /etc/pg-backup-sidecar/db/password}
- {name: SIDECAR_API_TOKEN_FILE, value: /etc/pg-backup-sidecar/api/api-token}
- {name: SIDECAR_CONFIG, value: /etc/pg-backup-sidecar/config/config.yaml}
{{- if .Values.backup.persistence.enabled }}
- {name: BACKUP_DIR, value: /backups}
{{- else }}
{{- /* no backups volume: straight to the remote store; the empty value overrides the image's BACKUP_DIR */}}
- {name: BACKUP_DIR, value: ""}
- {name: BACKUP_VOLUME, value: "false"}
- {name: SIDECAR_STATE_DIR, value: /var/lib/pg-backup-sidecar}
{{- end }}
- {name: TMPDIR, value: /tmp}
{{- if include "sidecar.identitySecret" . }}
- {name: BACKUP_ENCRYPTION_IDENTITY_FILE, value: /etc/pg-backup-sidecar/age/identity.txt}
{{- end }}
{{- if include "sidecar.replicationUser" . }}
{{- /* the dedicated replication role: its URL names no password, which is a file of a Secret volume */}}
- {name: WAL_REPLICATION_URL, value: {{ include "sidecar.replicationUrl" . | quote }}}
- {name: WAL_REPLICATION_PASSWORD_FILE, value: /etc/pg-backup-sidecar/replication/password}
{{- end }}
{{- if .Values.remote.url }}
{{- range $name, $value := .Values.remote.extraEnv }}
- {name: {{ $name }}, value: {{ $value | quote }}}
{{- end }}
{{- end }}
{{- if include "sidecar.remoteSecret" . }}
{{- /* paths only: the keys are files of a Secret volume, never environment values */}}
- {name: BACKUP_REMOTE_ACCESS_KEY_ID_FILE, value: /etc/pg-backup-sidecar/remote/access-key-id}
- {name: BACKUP_REMOTE_SECRET_ACCESS_KEY_FILE, value: /etc/pg-backup-sidecar/remote/secret-access-key}
{{- if and .Values.remote.existingSecret .Values.remote.existingSecretKeys.sessionToken }}
- {name: BACKUP_REMOTE_SESSION_TOKEN_FILE, value: /etc/pg-backup-sidecar/remote/session-token}
{{- end }}
{{- end }}
{{- end -}}

{{- define "sidecar.mounts" -}}
{{- if .Values.backup.persistence.enabled }}
- {name: backups, mountPath: /backups}
{{- else }}
- {name: state, mountPath: /var/lib/pg-backup-sidecar}
{{- end }}
- {name: tmp, mountPath: /tmp}
- {name: config, mountPath: /etc/pg-backup-sidecar/config, readOnly: true}
- {name: db-secret, mountPath: /etc/pg-backup-sidecar/db, readOnly: true}
- {name: api-secret, mountPath: /etc/pg-backup-sidecar/api, readOnly: true}
{{- if include "sidecar.identitySecret" . }}
- {name: age-identity, mountPath: /etc/pg-backup-sidecar/age, readOnly: true}
{{- end }}
{{- if include "sidecar.replicationSecret" . }}
- {name: wal-replication, mountPath: /etc/pg-backup-sidecar/replication, readOnly: true}
{{- end }}
{{- if include "sidecar.remoteSecret" . }}
- {name: remote-credentials, mountPath: /etc/pg-backup-sidecar/remote, readOnly: true}
{{- end }}
{{- end -}}
