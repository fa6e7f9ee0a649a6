{{/*
Labels every object of the release carries.
*/}}
{{- define "meshlite.labels" -}}
app.kubernetes.io/part-of: meshlite
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/*
The image of a component: meshlite.image (dict "root" $ "name" "ztunnel" "override" .Values.ztunnel.image).
*/}}
{{- define "meshlite.image" -}}
{{- if .override -}}
{{ .override }}
{{- else -}}
{{- $reg := trimSuffix "/" .root.Values.image.registry -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{ if $reg }}{{ $reg }}/{{ end }}{{ .name }}:{{ $tag }}
{{- end -}}
{{- end }}

{{/*
The name istiod-lite's serving certificate holds, and its default address.
*/}}
{{- define "meshlite.istiodHost" -}}
istiod.{{ .Release.Namespace }}.svc
{{- end }}

{{/*
Node proxies istiod-lite lets ask for the identity of pods on their node.
*/}}
{{- define "meshlite.trustedNodeAccounts" -}}
{{- if .Values.istiod.trustedNodeAccounts -}}
{{ join "," .Values.istiod.trustedNodeAccounts }}
{{- else -}}
{{ .Release.Namespace }}/ztunnel
{{- end -}}
{{- end }}
