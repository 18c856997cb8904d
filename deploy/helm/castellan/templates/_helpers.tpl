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
Where the chart mounts what it is given. None of them is under the data
directory: the server refuses a key-encryption key inside it, and with
persistence off the data directory dies with the pod.
*/}}
{{- define "castellan.kekDir" -}}/etc/castellan-kek{{- end }}
{{- define "castellan.auditKeyDir" -}}/etc/castellan-audit{{- end }}
{{- define "castellan.postgresDir" -}}/etc/castellan-postgres{{- end }}
{{- define "castellan.vaultDir" -}}/etc/castellan-vault{{- end }}
{{- define "castellan.gcpDir" -}}/etc/castellan-gcp{{- end }}
{{- define "castellan.awsDir" -}}/etc/castellan-aws{{- end }}
{{- define "castellan.bundleEndpointDir" -}}/etc/castellan-bundle-endpoint{{- end }}

{{/*
Which optional mounts the values ask for (each "true" or "").
*/}}
{{- define "castellan.signer" -}}{{ .Values.config.signer | default "selfsigned" }}{{- end }}
{{- define "castellan.vaultMounts" -}}
{{- if eq (include "castellan.signer" .) "vault" -}}
{{- if or .Values.vault.tokenSecret.name .Values.vault.secretIDSecret.name .Values.vault.caConfigMap.name .Values.vault.caSecret.name .Values.vault.kubernetesTokenAudience -}}true{{- end -}}
{{- end -}}
{{- end }}

{{/*
The server's configuration file as YAML: .Values.config plus the keys the chart
owns (listen addresses, data directory) and the file paths of what it mounts.
*/}}
{{- define "castellan.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if not $cfg.servingDNSNames }}
{{- $_ := set $cfg "servingDNSNames" (include "castellan.defaultServingDNSNames" . | fromYamlArray) }}
{{- end }}
{{- $_ := set $cfg "listen" (printf ":%s" (include "castellan.grpcContainerPort" .)) }}
{{- $_ := set $cfg "monitoringListen" (printf ":%s" (include "castellan.monitoringContainerPort" .)) }}
{{- $_ := set $cfg "dataDir" (include "castellan.dataDir" .) }}
{{- $signer := include "castellan.signer" . }}
{{- if eq $signer "intermediate" }}
{{- $_ := set $cfg "cacertsDir" .Values.intermediate.mountPath }}
{{- end }}
{{- if .Values.rotation.kekSecretName }}
{{- $_ := set $cfg "caKEKFile" (printf "%s/kek" (include "castellan.kekDir" .)) }}
{{- end }}
{{- if .Values.audit.checkpointKeySecret.name }}
{{- $_ := set $cfg "auditCheckpointKey" (printf "%s/audit-checkpoint-key.pem" (include "castellan.auditKeyDir" .)) }}
{{- end }}
{{- if .Values.bundleEndpoint.tlsSecretName }}
{{- $_ := set $cfg "bundleEndpointCertFile" (printf "%s/tls.crt" (include "castellan.bundleEndpointDir" .)) }}
{{- $_ := set $cfg "bundleEndpointKeyFile" (printf "%s/tls.key" (include "castellan.bundleEndpointDir" .)) }}
{{- end }}
{{- if eq $signer "vault" }}
{{- $v := $cfg.vault | default dict }}
{{- $dir := include "castellan.vaultDir" . }}
{{- if .Values.vault.tokenSecret.name }}{{ $_ := set $v "tokenFile" (printf "%s/token" $dir) }}{{ end }}
{{- if .Values.vault.secretIDSecret.name }}{{ $_ := set $v "secretIDFile" (printf "%s/secret-id" $dir) }}{{ end }}
{{- if or .Values.vault.caConfigMap.name .Values.vault.caSecret.name }}{{ $_ := set $v "caFile" (printf "%s/ca.crt" $dir) }}{{ end }}
{{- if .Values.vault.kubernetesTokenAudience }}{{ $_ := set $v "jwtFile" (printf "%s/sa-token" $dir) }}{{ end }}
{{- $_ := set $cfg "vault" $v }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Checks of values the server cannot check itself (it never sees them, or only
after the pod is scheduled), with messages naming the value.
*/}}
{{- define "castellan.validate" -}}
{{- $v := .Values }}
{{- $in := $v.config }}
{{- $signer := include "castellan.signer" . }}
{{- range $key := list "listen" "monitoringListen" "dataDir" "cacertsDir" }}
{{- if hasKey $in $key }}
{{- fail (printf "config.%s: set by the chart (ports 15012/15014, /var/lib/castellan, intermediate.mountPath); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- /* A file key is either the chart's (from a mounted Secret) or yours (extraVolumes), never both. */}}
{{- $vin := $in.vault | default dict }}
{{- range $pair := list
      (list $v.rotation.kekSecretName "caKEKFile" $in.caKEKFile "rotation.kekSecretName")
      (list $v.audit.checkpointKeySecret.name "auditCheckpointKey" $in.auditCheckpointKey "audit.checkpointKeySecret.name")
      (list $v.bundleEndpoint.tlsSecretName "bundleEndpointCertFile" $in.bundleEndpointCertFile "bundleEndpoint.tlsSecretName")
      (list $v.bundleEndpoint.tlsSecretName "bundleEndpointKeyFile" $in.bundleEndpointKeyFile "bundleEndpoint.tlsSecretName")
      (list $v.vault.tokenSecret.name "vault.tokenFile" $vin.tokenFile "vault.tokenSecret.name")
      (list $v.vault.secretIDSecret.name "vault.secretIDFile" $vin.secretIDFile "vault.secretIDSecret.name")
      (list (or $v.vault.caConfigMap.name $v.vault.caSecret.name) "vault.caFile" $vin.caFile "vault.caConfigMap.name/vault.caSecret.name")
      (list $v.vault.kubernetesTokenAudience "vault.jwtFile" $vin.jwtFile "vault.kubernetesTokenAudience") }}
{{- if and (index $pair 0) (index $pair 2) }}
{{- fail (printf "config.%s: set by the chart when %s is given (it mounts the file); remove one of them" (index $pair 1) (index $pair 3)) }}
{{- end }}
{{- end }}
{{- if not (has $signer (list "selfsigned" "intermediate" "vault" "googlecas" "awspca")) }}
{{- fail (printf "config.signer: %q is not one of selfsigned, intermediate, vault, googlecas, awspca" $signer) }}
{{- end }}
{{- if eq $signer "intermediate" }}
{{- if not $v.intermediate.secretName }}
{{- fail "intermediate.secretName: required with config.signer intermediate (a Secret with Istio cacerts or kubernetes.io/tls keys)" }}
{{- end }}
{{- if not (has $v.intermediate.layout (list "cacerts" "tls")) }}
{{- fail (printf "intermediate.layout: %q is not cacerts or tls" $v.intermediate.layout) }}
{{- end }}
{{- end }}

{{- /* The final configuration decides: values may set a key directly or through a mount. */}}
{{- $cfg := include "castellan.config" . | fromYaml }}
{{- $dataDir := include "castellan.dataDir" . }}
{{- $pg := ne ($cfg.auditDSN | default "") "" }}
{{- $replicas := int $v.replicaCount }}
{{- if lt $replicas 1 }}
{{- fail (printf "replicaCount: must be at least 1 (got %v)" $v.replicaCount) }}
{{- end }}
{{- if and (gt $replicas 1) (not $pg) }}
{{- fail (printf "replicaCount: must be 1 with the embedded audit store (got %v): it is a single-writer SQLite file in one pod's volume, and a self-signed root is per data volume. Several replicas need the PostgreSQL store: set config.auditDSN (and rotation.kekSecretName, audit.checkpointKeySecret.name, persistence.enabled=false)" $v.replicaCount) }}
{{- end }}
{{- if and $pg (eq $signer "selfsigned") (not $cfg.caKEKFile) }}
{{- fail "rotation.kekSecretName: required with config.auditDSN and signer selfsigned: the CA keys live in the shared database, sealed under a key-encryption key that every replica mounts from one Secret (32 random bytes, raw or base64)" }}
{{- end }}
{{- if and (gt $replicas 1) $v.persistence.enabled }}
{{- fail (printf "persistence.enabled: must be false with replicaCount %v: one ReadWriteOnce claim cannot be shared by several pods, and with PostgreSQL the data directory holds only per-pod files (operator credential, server.json, trust bundle copy)" $v.replicaCount) }}
{{- end }}
{{- if and $pg (not $v.persistence.enabled) }}
{{- if or (not $cfg.auditCheckpointKey) (hasPrefix (printf "%s/" $dataDir) ($cfg.auditCheckpointKey | toString)) }}
{{- fail "audit.checkpointKeySecret.name: required with config.auditDSN and persistence.enabled=false: the Ed25519 key signing audit prune checkpoints must be the same in every pod and survive restarts, or `castellanctl audit verify` fails on checkpoints signed by a lost key" }}
{{- end }}
{{- end }}
{{- if and $pg $cfg.auditWriter (or (gt $replicas 1) (not $v.persistence.enabled)) }}
{{- fail "config.auditWriter: must be empty with several replicas or a rolling update: two processes appending to one chain id would corrupt it; the default (<pod name>-<random>) is unique per process" }}
{{- end }}
{{- if and (not $pg) (or $v.postgres.passwordSecret.name $v.postgres.caSecret.name) }}
{{- fail "postgres.passwordSecret/postgres.caSecret: set, but config.auditDSN is empty (the embedded store is in use)" }}
{{- end }}

{{- /* Signer credentials belong to their signer only. */}}
{{- if and (ne $signer "vault") (or $v.vault.tokenSecret.name $v.vault.secretIDSecret.name $v.vault.caConfigMap.name $v.vault.caSecret.name $v.vault.kubernetesTokenAudience) }}
{{- fail (printf "vault.*: Vault credentials are set, but config.signer is %q" $signer) }}
{{- end }}
{{- if and (ne $signer "googlecas") $v.googleCAS.credentialsSecret.name }}
{{- fail (printf "googleCAS.credentialsSecret.name: set, but config.signer is %q" $signer) }}
{{- end }}
{{- if and (ne $signer "awspca") $v.awsPCA.credentialsSecret.name }}
{{- fail (printf "awsPCA.credentialsSecret.name: set, but config.signer is %q" $signer) }}
{{- end }}
{{- if and $v.vault.caConfigMap.name $v.vault.caSecret.name }}
{{- fail "vault.caConfigMap.name, vault.caSecret.name: give one of them" }}
{{- end }}
{{- if eq $signer "vault" }}
{{- $vc := $cfg.vault | default dict }}
{{- $method := $vc.authMethod | default "kubernetes" }}
{{- if and (eq $method "token") (not $vc.tokenFile) }}
{{- fail "vault.tokenSecret.name: required with config.vault.authMethod token (a Secret holding the Vault token)" }}
{{- end }}
{{- if and (eq $method "approle") (not $vc.secretIDFile) }}
{{- fail "vault.secretIDSecret.name: required with config.vault.authMethod approle (a Secret holding the AppRole secret ID; config.vault.roleID holds the role ID)" }}
{{- end }}
{{- if and $v.vault.tokenSecret.name (ne $method "token") }}
{{- fail (printf "vault.tokenSecret.name: set, but config.vault.authMethod is %q (not token)" $method) }}
{{- end }}
{{- if and $v.vault.secretIDSecret.name (ne $method "approle") }}
{{- fail (printf "vault.secretIDSecret.name: set, but config.vault.authMethod is %q (not approle)" $method) }}
{{- end }}
{{- if and $v.vault.kubernetesTokenAudience (ne $method "kubernetes") }}
{{- fail (printf "vault.kubernetesTokenAudience: set, but config.vault.authMethod is %q (not kubernetes)" $method) }}
{{- end }}
{{- if and (eq $method "kubernetes") (not $vc.jwtFile) (not $v.serviceAccount.automountServiceAccountToken) }}
{{- fail "vault.kubernetesTokenAudience: the Vault Kubernetes login needs a service-account token: set vault.kubernetesTokenAudience (a projected token for that audience) or keep serviceAccount.automountServiceAccountToken true" }}
{{- end }}
{{- end }}

{{- /* OIDC files the chart mounts from a ConfigMap. */}}
{{- $oidc := $cfg.oidc | default dict }}
{{- range $i, $iss := ($oidc.issuers | default list) }}
{{- range $key := list "caCert" "jwksFile" }}
{{- $f := (get $iss $key) | default "" | toString }}
{{- if and (hasPrefix (printf "%s/" $v.oidc.mountPath) $f) (not $v.oidc.configMapName) }}
{{- fail (printf "oidc.configMapName: config.oidc.issuers[%d].%s is %s, under oidc.mountPath, but no ConfigMap is mounted there" $i $key $f) }}
{{- end }}
{{- end }}
{{- end }}

{{- /* SPIFFE bundle endpoint. */}}
{{- $be := $cfg.bundleEndpointListen | default "" | toString }}
{{- if $be }}
{{- if not (regexMatch "^[^:]*:[0-9]+$" $be) }}
{{- fail (printf "config.bundleEndpointListen: %q is not [host]:port (the chart needs the port for the Service)" $be) }}
{{- end }}
{{- if has (include "castellan.bundleEndpointPort" .) (list (include "castellan.grpcContainerPort" .) (include "castellan.monitoringContainerPort" .)) }}
{{- fail (printf "config.bundleEndpointListen: port %s is already the gRPC or monitoring port" (include "castellan.bundleEndpointPort" .)) }}
{{- end }}
{{- if and (eq ($cfg.bundleEndpointAuth | default "https_spiffe") "https_web") (not $cfg.bundleEndpointCertFile) }}
{{- fail "bundleEndpoint.tlsSecretName: required with config.bundleEndpointAuth https_web (a kubernetes.io/tls Secret with the Web PKI certificate and key)" }}
{{- end }}
{{- else if $v.bundleEndpoint.tlsSecretName }}
{{- fail "bundleEndpoint.tlsSecretName: set, but config.bundleEndpointListen is empty (the bundle endpoint is off)" }}
{{- end }}
{{- end }}

{{/*
Container port of the SPIFFE bundle endpoint: the port of config.bundleEndpointListen, or "".
*/}}
{{- define "castellan.bundleEndpointPort" -}}
{{- with .Values.config.bundleEndpointListen }}{{ regexFind "[0-9]+$" (toString .) }}{{ end }}
{{- end }}
