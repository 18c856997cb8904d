{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "castellan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of every object: the release name, prefixed with the chart name unless
the release name already contains it. Release "castellan" gives "castellan".
*/}}
{{- define "castellan.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "castellan.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "castellan.labels" -}}
helm.sh/chart: {{ include "castellan.chart" . }}
{{ include "castellan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: certificate-authority
app.kubernetes.io/part-of: castellan
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (never add the version here).
*/}}
{{- define "castellan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "castellan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount the pod runs as.
*/}}
{{- define "castellan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "castellan.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference.
*/}}
{{- define "castellan.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Fixed container-side settings the templates depend on.
*/}}
{{- define "castellan.dataDir" -}}/var/lib/castellan{{- end }}
{{- define "castellan.configDir" -}}/etc/castellan{{- end }}
{{- define "castellan.grpcContainerPort" -}}15012{{- end }}
{{- define "castellan.monitoringContainerPort" -}}15014{{- end }}

{{/*
Default serving DNS names: the Service's own names (what clients dial), Istio's
default CA host, and localhost for kubectl port-forward.
*/}}
{{- define "castellan.defaultServingDNSNames" -}}
{{- $svc := include "castellan.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "istiod.istio-system.svc" "localhost" | toYaml }}
{{- end }}

{{/*
Checks of values the server cannot check itself (it never sees them), with
messages naming the value.
*/}}
{{- define "castellan.validate" -}}
{{- if ne (int .Values.replicaCount) 1 }}
{{- fail (printf "replicaCount: must be 1 (got %v): the embedded SQLite audit store is single-writer and a self-signed root is per data volume; multi-replica operation is not implemented yet" .Values.replicaCount) }}
{{- end }}
{{- range $key := list "listen" "monitoringListen" "dataDir" "cacertsDir" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s: set by the chart (ports 15012/15014, /var/lib/castellan, intermediate.mountPath); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- $signer := .Values.config.signer | default "selfsigned" }}
{{- if not (has $signer (list "selfsigned" "intermediate")) }}
{{- fail (printf "config.signer: %q is not one of selfsigned, intermediate" $signer) }}
{{- end }}
{{- if eq $signer "intermediate" }}
{{- if not .Values.intermediate.secretName }}
{{- fail "intermediate.secretName: required with config.signer intermediate (a Secret with Istio cacerts or kubernetes.io/tls keys)" }}
{{- end }}
{{- if not (has .Values.intermediate.layout (list "cacerts" "tls")) }}
{{- fail (printf "intermediate.layout: %q is not cacerts or tls" .Values.intermediate.layout) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The server's configuration file: .Values.config plus the keys the chart owns.
*/}}
{{- define "castellan.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if not $cfg.servingDNSNames }}
{{- $_ := set $cfg "servingDNSNames" (include "castellan.defaultServingDNSNames" . | fromYamlArray) }}
{{- end }}
{{- $_ := set $cfg "listen" (printf ":%s" (include "castellan.grpcContainerPort" .)) }}
{{- $_ := set $cfg "monitoringListen" (printf ":%s" (include "castellan.monitoringContainerPort" .)) }}
{{- $_ := set $cfg "dataDir" (include "castellan.dataDir" .) }}
{{- if eq ($cfg.signer | default "selfsigned") "intermediate" }}
{{- $_ := set $cfg "cacertsDir" .Values.intermediate.mountPath }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
