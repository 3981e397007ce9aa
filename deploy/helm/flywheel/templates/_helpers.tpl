{{/* <release>-<component> */}}
{{- define "flywheel.name" -}}
{{- printf "%s-%s" .root.Release.Name .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flywheel.selector" -}}
app.kubernetes.io/name: flywheel
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flywheel.labels" -}}
{{ include "flywheel.selector" . }}
app.kubernetes.io/part-of: flywheel
app.kubernetes.io/version: {{ .root.Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "flywheel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "flywheel.modelPath" -}}
/models/{{ .Values.model.dir }}
{{- end -}}

{{- define "flywheel.embedderPath" -}}
/models/{{ .Values.model.embedderDir }}
{{- end -}}

{{/* The Secret a component reads: the one you manage, or the chart's. */}}
{{- define "flywheel.secretName" -}}
{{- $values := index .root.Values .component -}}
{{- if and $values $values.existingSecret -}}
{{ $values.existingSecret }}
{{- else -}}
{{ include "flywheel.name" . }}
{{- end -}}
{{- end -}}

{{- define "flywheel.databaseUrl" -}}
{{- if .Values.database.enabled -}}
postgresql+psycopg://{{ .Values.database.user }}:{{ .Values.secrets.databasePassword | urlquery }}@{{ .Release.Name }}-postgres:5432/{{ .Values.database.name }}
{{- else -}}
{{ required "database.enabled=false needs secrets.databaseUrl" .Values.secrets.databaseUrl }}
{{- end -}}
{{- end -}}

{{/* uid 10001 (the image's user); fsGroup makes the volumes writable to it. */}}
{{- define "flywheel.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "flywheel.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  allowPrivilegeEscalation: false
  capabilities: {drop: [ALL]}
{{- end -}}

{{/* Settings every Flywheel container reads alike. */}}
{{- define "flywheel.commonEnv" -}}
- {name: FLYWHEEL_BASE_MODEL, value: {{ include "flywheel.modelPath" . | quote }}}
- {name: FLYWHEEL_EMBED_MODEL, value: {{ include "flywheel.embedderPath" . | quote }}}
- {name: FLYWHEEL_ADAPTERS_DIR, value: /adapters}
- {name: FLYWHEEL_LOG_JSON, value: "1"}
{{- end -}}

{{/* http://<release>-vllm-0.<release>-vllm:8000,... : one URL per StatefulSet pod (the headless
Service gives each its own DNS name in the namespace), so the gateway loads every adapter into
every pod. */}}
{{- define "flywheel.vllmUrls" -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.vllm.replicas) -}}
{{- $urls = append $urls (printf "http://%s-vllm-%d.%s-vllm:8000" $.Release.Name $i $.Release.Name) -}}
{{- end -}}
{{ join "," $urls }}
{{- end -}}

{{- define "flywheel.checks" -}}
{{- if not (has (int .Values.lora.rank) (list 1 8 16 32 64 128 256 320 512)) -}}
{{- fail (printf "lora.rank=%v: vLLM's --max-lora-rank takes 1, 8, 16, 32, 64, 128, 256, 320 or 512" .Values.lora.rank) -}}
{{- end -}}
{{- if lt (int .Values.vllm.gpusPerPod) 1 -}}
{{- fail "vllm.gpusPerPod must be at least 1" -}}
{{- end -}}
{{- if lt (int .Values.vllm.replicas) 1 -}}
{{- fail "vllm.replicas must be at least 1 (the gateway's backend is vLLM)" -}}
{{- end -}}
{{- if and (gt (int .Values.trainer.gpus) 1) (not .Values.trainer.launcher) -}}
{{- fail "trainer.gpus > 1: `flywheel train run` trains on one device; set trainer.launcher to a per-GPU launcher" -}}
{{- end -}}
{{- if contains "/" .Values.model.dir -}}
{{- fail "model.dir is a folder name under /models (the Hub id goes in model.hubId)" -}}
{{- end -}}
{{- if not (has .Values.bot.mode (list "socket" "http")) -}}
{{- fail "bot.mode is socket or http" -}}
{{- end -}}
{{- end -}}
