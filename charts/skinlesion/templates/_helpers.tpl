{{/*
Names, labels and the pod pieces shared by every workload of the chart.
*/}}

{{/* The chart name (app.kubernetes.io/name). */}}
{{- define "skinlesion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix, at most 63 characters (DNS label). A release whose name
already contains the chart name is used as is.
*/}}
{{- define "skinlesion.fullname" -}}
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

{{/* Chart name and version for the helm.sh/chart label. */}}
{{- define "skinlesion.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the release carries. */}}
{{- define "skinlesion.labels" -}}
helm.sh/chart: {{ include "skinlesion.chart" . }}
{{ include "skinlesion.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: {{ include "skinlesion.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that identify the release (selectors). */}}
{{- define "skinlesion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skinlesion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* labels plus app.kubernetes.io/component. Call with (dict "root" $ "component" "x"). */}}
{{- define "skinlesion.componentLabels" -}}
{{ include "skinlesion.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* selectorLabels plus app.kubernetes.io/component. (dict "root" $ "component" "x") */}}
{{- define "skinlesion.componentSelectorLabels" -}}
{{ include "skinlesion.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of a stage Job shape. The controller, not Helm, creates these Jobs, so
managed-by names it. (dict "root" $ "component" "<stage>")
*/}}
{{- define "skinlesion.stageLabels" -}}
helm.sh/chart: {{ include "skinlesion.chart" .root }}
{{ include "skinlesion.componentSelectorLabels" . }}
{{- if .root.Chart.AppVersion }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: {{ include "skinlesion.name" .root }}
app.kubernetes.io/managed-by: skinlesion-controller
{{- end }}

{{/* --- object names (each a DNS label of at most 63 characters) --- */}}

{{/* The controller's identity, bound to its Role. */}}
{{- define "skinlesion.serviceAccountName" -}}
{{- include "skinlesion.fullname" . | trunc 52 | trimSuffix "-" }}-controller
{{- end }}

{{/* The stage pods' identity: no RBAC, no API token; annotations for a store IAM role. */}}
{{- define "skinlesion.stageServiceAccountName" -}}
{{- include "skinlesion.fullname" . | trunc 56 | trimSuffix "-" }}-stages
{{- end }}

{{- define "skinlesion.controllerName" -}}
{{- include "skinlesion.fullname" . | trunc 52 | trimSuffix "-" }}-controller
{{- end }}

{{- define "skinlesion.stagesConfigMapName" -}}
{{- include "skinlesion.fullname" . | trunc 56 | trimSuffix "-" }}-stages
{{- end }}

{{- define "skinlesion.minioName" -}}
{{- include "skinlesion.fullname" . | trunc 57 | trimSuffix "-" }}-minio
{{- end }}

{{/* CronJob names may have at most 52 characters (the Job name adds 11). */}}
{{- define "skinlesion.cronJobName" -}}
{{- include "skinlesion.fullname" . | trunc 44 | trimSuffix "-" }}-retrain
{{- end }}

{{/* The run id of the one-off controller Job: run.id, or rev-<revision>. */}}
{{- define "skinlesion.runId" -}}
{{- .Values.run.id | default (printf "rev-%d" (int .Release.Revision)) }}
{{- end }}

{{/* <fullname>-run-<run id>, shortening the prefix so that the run id stays whole. */}}
{{- define "skinlesion.runJobName" -}}
{{- $id := include "skinlesion.runId" . }}
{{- $prefix := include "skinlesion.fullname" . | trunc (int (sub 58 (len $id))) | trimSuffix "-" }}
{{- printf "%s-run-%s" $prefix $id }}
{{- end }}

{{/* --- store --- */}}

{{/* s3://bucket or s3://bucket/prefix */}}
{{- define "skinlesion.storeUri" -}}
{{- if .Values.store.prefix }}
{{- printf "s3://%s/%s" .Values.store.bucket .Values.store.prefix }}
{{- else }}
{{- printf "s3://%s" .Values.store.bucket }}
{{- end }}
{{- end }}

{{- define "skinlesion.rawUri" -}}
{{- .Values.store.raw | default (printf "%s/raw/HAM10000" (include "skinlesion.storeUri" .)) }}
{{- end }}

{{/* store.endpoint, else the in-chart MinIO when enabled, else empty (AWS S3). */}}
{{- define "skinlesion.storeEndpoint" -}}
{{- if .Values.store.endpoint }}
{{- .Values.store.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc:9000" (include "skinlesion.minioName" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
S3 connection env: settings from values; credentials from the existing Secret, as
environment variables (store.credentials: env) or as a mounted shared-credentials file
(file: AWS_SHARED_CREDENTIALS_FILE); none when store.existingSecret is empty (the pod's
identity: IRSA / Workload Identity through serviceAccount.*.annotations).
*/}}
{{- define "skinlesion.storeEnv" -}}
- name: AWS_REGION
  value: {{ .Values.store.region | quote }}
{{- with (include "skinlesion.storeEndpoint" .) }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.store.existingSecret }}
{{- if eq .Values.store.credentials "file" }}
- name: AWS_SHARED_CREDENTIALS_FILE
  value: /etc/skinlesion-s3/credentials
{{- else }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}
{{- end }}

{{/* The credentials file's mount and volume (store.credentials: file); else empty. */}}
{{- define "skinlesion.credentialsMount" -}}
{{- if and .Values.store.existingSecret (eq .Values.store.credentials "file") }}
- name: s3-credentials
  mountPath: /etc/skinlesion-s3
  readOnly: true
{{- end }}
{{- end }}

{{- define "skinlesion.credentialsVolume" -}}
{{- if and .Values.store.existingSecret (eq .Values.store.credentials "file") }}
- name: s3-credentials
  secret:
    secretName: {{ .Values.store.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.store.credentialsFileKey }}
        path: credentials
{{- end }}
{{- end }}

{{/* podAnnotations / podLabels of every pipeline pod (stage and controller). */}}
{{- define "skinlesion.podExtraLabels" -}}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "skinlesion.podAnnotations" -}}
{{- with .Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* --- pods --- */}}

{{/* The CPU image (`make image`: controller, CPU stages). */}}
{{- define "skinlesion.image" -}}
{{- include "skinlesion.imageRef" (dict "repository" .Values.image.repository "tag" (.Values.image.digest | default .Values.image.tag | default .Chart.AppVersion)) }}
{{- end }}

{{/* The GPU image (`make image-gpu`: stages that request GPUs): image.gpuTag or <tag>-gpu. */}}
{{- define "skinlesion.gpuImage" -}}
{{- $tag := .Values.image.gpuDigest | default .Values.image.gpuTag | default (printf "%s-gpu" (.Values.image.tag | default .Chart.AppVersion)) }}
{{- include "skinlesion.imageRef" (dict "repository" .Values.image.repository "tag" $tag) }}
{{- end }}

{{- define "skinlesion.imageRef" -}}
{{- if hasPrefix "sha256:" .tag }}
{{- printf "%s@%s" .repository .tag }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/*
imagePullSecrets and the pool's nodeSelector / tolerations / affinity of a pod spec;
empty when none is set. (dict "root" $ "pool" "cpu")
*/}}
{{- define "skinlesion.podPlacement" -}}
{{- with .root.Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- include "skinlesion.scheduling" . }}
{{- end }}

{{/* The uid/gid of the image's user (Dockerfile). */}}
{{- define "skinlesion.uid" -}}10001{{- end }}

{{/* Pod Security Standard "restricted", pod level. */}}
{{- define "skinlesion.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ include "skinlesion.uid" . }}
runAsGroup: {{ include "skinlesion.uid" . }}
fsGroup: {{ include "skinlesion.uid" . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod Security Standard "restricted", container level, with a read-only root. */}}
{{- define "skinlesion.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ include "skinlesion.uid" . }}
runAsGroup: {{ include "skinlesion.uid" . }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* nodeSelector / tolerations / affinity of a pool. (dict "root" $ "pool" "cpu") */}}
{{- define "skinlesion.scheduling" -}}
{{- $pool := index .root.Values.pools .pool }}
{{- with $pool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Job podFailurePolicy: a pod lost to node preemption or eviction (DisruptionTarget)
is not counted; exit codes that a retry of the same pod cannot help fail the Job at
once (errors.py NOT_RETRIED): 2 bad input, 3 another writer holds the run, 4 damaged
run (the pipeline reruns the stale stages on the next run instead), 5 the run was
cancelled, 6 a stage failed on every retry (a restarted controller would spend a new
retry budget on it; the controller Job's backoffLimit is for its own crashes).
Call with the container name.
*/}}
{{- define "skinlesion.podFailurePolicy" -}}
rules:
  - action: Ignore
    onPodConditions:
      - type: DisruptionTarget
        status: "True"
  - action: FailJob
    onExitCodes:
      containerName: {{ . }}
      operator: In
      values: [2, 3, 4, 5, 6]
{{- end }}

{{/*
A complete batch/v1 Job for one stage, without a name and without args: the
controller names it <release>-<stage>-<run-id>[-<attempt>] and appends the
stage's arguments. (dict "root" $ "stage" "<stage>"; entrypoints: _stages.tpl)
*/}}
{{- define "skinlesion.stageJob" -}}
{{- $root := .root }}
{{- $s := index $root.Values.stages .stage }}
{{- $entry := index (include "skinlesion.stageEntrypoints" . | fromYaml) .stage }}
{{- $labels := dict "root" $root "component" .stage }}
{{- $resources := deepCopy $s.resources }}
{{- $image := include "skinlesion.image" $root }}
{{- $workers := include "skinlesion.stageWorkers" . | int }}
{{- if and (eq $s.pool "gpu") $root.Values.pools.gpu.requestGpu }}
{{- $image = include "skinlesion.gpuImage" $root }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (int $root.Values.pools.gpu.gpuCount) }}
{{- $_ := set $resources "limits" $limits }}
{{- end -}}
apiVersion: batch/v1
kind: Job
metadata:
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "skinlesion.stageLabels" $labels | nindent 4 }}
spec:
  {{- if gt $workers 1 }}
  completionMode: Indexed
  completions: {{ $workers }}
  parallelism: {{ $workers }}
  {{- end }}
  backoffLimit: {{ int $s.backoffLimit }}
  activeDeadlineSeconds: {{ int $s.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ int $root.Values.ttlSecondsAfterFinished }}
  podFailurePolicy:
    {{- include "skinlesion.podFailurePolicy" "stage" | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "skinlesion.stageLabels" $labels | nindent 8 }}
        {{- include "skinlesion.podExtraLabels" $root | indent 8 }}
      {{- include "skinlesion.podAnnotations" $root | nindent 6 }}
    spec:
      restartPolicy: Never
      {{- if gt $workers 1 }}
      subdomain: {{ include "skinlesion.workersServiceName" . }}
      {{- end }}
      serviceAccountName: {{ include "skinlesion.stageServiceAccountName" $root }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: 60
      securityContext:
        {{- include "skinlesion.podSecurityContext" $root | nindent 8 }}
      {{- with include "skinlesion.podPlacement" (dict "root" $root "pool" $s.pool) | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: stage
          image: {{ $image }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "/app/jobs/{{ $entry }}.py"]
          env:
            {{- include "skinlesion.storeEnv" $root | nindent 12 }}
            {{- include "skinlesion.obsEnv" (dict "root" $root "controller" false) | nindent 12 }}
            - name: SKINLESION_IMAGE_TAG  # recorded with a registered model version
              value: {{ $image | quote }}
            - name: SKINLESION_SCRATCH
              value: /scratch
            - name: TMPDIR
              value: /scratch
            - name: HOME
              value: /scratch
            {{- if gt $workers 1 }}
            {{- include "skinlesion.workersEnv" (dict "root" $root "stage" .stage "workers" $workers) | nindent 12 }}
            {{- end }}
          {{- if gt $workers 1 }}
          ports:
            - name: worker
              containerPort: {{ include "skinlesion.workerPort" . }}
          {{- end }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- include "skinlesion.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: scratch
              mountPath: /scratch
            - name: tmp
              mountPath: /tmp
            {{- include "skinlesion.credentialsMount" $root | nindent 12 }}
      volumes:
        - name: scratch
          emptyDir:
            sizeLimit: {{ $s.scratchSize }}
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
        {{- include "skinlesion.credentialsVolume" $root | nindent 8 }}
{{- end }}

{{/*
The controller pod template, shared by the one-off Job and the CronJob.
(dict "root" $ "runArgs" (list "--run-id" "x"))
*/}}
{{- define "skinlesion.controllerPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "skinlesion.componentLabels" (dict "root" $root "component" "controller") | nindent 4 }}
    {{- include "skinlesion.podExtraLabels" $root | indent 4 }}
  {{- include "skinlesion.podAnnotations" $root | nindent 2 }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "skinlesion.serviceAccountName" $root }}
  automountServiceAccountToken: true
  enableServiceLinks: false
  securityContext:
    {{- include "skinlesion.podSecurityContext" $root | nindent 4 }}
  {{- with include "skinlesion.podPlacement" (dict "root" $root "pool" "cpu") | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: controller
      image: {{ include "skinlesion.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["python", "/app/jobs/controller.py"]
      args:
        - --stages
        - /etc/skinlesion/stages.yaml
        - --config
        - /etc/skinlesion/pipeline.yaml
        - --preset
        - {{ $root.Values.pipeline.preset | quote }}
        - --namespace
        - {{ $root.Release.Namespace | quote }}
        - --release
        - {{ $root.Release.Name | quote }}
        - --store
        - {{ include "skinlesion.storeUri" $root | quote }}
        - --raw
        - {{ include "skinlesion.rawUri" $root | quote }}
        {{- range .runArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- include "skinlesion.storeEnv" $root | nindent 8 }}
        {{- include "skinlesion.obsEnv" (dict "root" $root "controller" true) | nindent 8 }}
        - name: SKINLESION_JOB_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['job-name']
        - name: HOME
          value: /tmp
        - name: TMPDIR
          value: /tmp
      resources:
        {{- toYaml $root.Values.controller.resources | nindent 8 }}
      securityContext:
        {{- include "skinlesion.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/skinlesion
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- include "skinlesion.credentialsMount" $root | nindent 8 }}
  volumes:
    - name: config
      configMap:
        name: {{ include "skinlesion.stagesConfigMapName" $root }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- include "skinlesion.credentialsVolume" $root | nindent 4 }}
{{- end }}

{{/* The controller Job spec (one-off Job and CronJob jobTemplate). (dict "root" $ "runArgs" ...) */}}
{{- define "skinlesion.controllerJobSpec" -}}
{{- $root := .root -}}
backoffLimit: {{ int $root.Values.controller.backoffLimit }}
activeDeadlineSeconds: {{ int $root.Values.controller.activeDeadlineSeconds }}
ttlSecondsAfterFinished: {{ int $root.Values.ttlSecondsAfterFinished }}
podFailurePolicy:
  {{- include "skinlesion.podFailurePolicy" "controller" | nindent 2 }}
template:
  {{- include "skinlesion.controllerPodTemplate" . | nindent 2 }}
{{- end }}

{{/*
Observability env (README "Observability"): the Pushgateway URL on stage and controller
pods, a stage's attempt number from its pod label, the run-end webhook URL (controller)
from an existing Secret, MLflow's tracking URI, experiment, model name and credentials
(from an existing Secret) on stage and controller pods. Empty values render nothing.
*/}}
{{- define "skinlesion.obsEnv" -}}
{{- $v := .root.Values }}
{{- with $v.metrics.pushgateway.url }}
- name: SKINLESION_PUSHGATEWAY_URL
  value: {{ . | quote }}
{{- if not $.controller }}
- name: SKINLESION_ATTEMPT
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['skinlesion.io/attempt']
{{- end }}
{{- end }}
{{- if and .controller $v.notify.webhookUrl.existingSecret }}
- name: SKINLESION_WEBHOOK_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.notify.webhookUrl.existingSecret }}
      key: {{ $v.notify.webhookUrl.key }}
{{- end }}
{{- with $v.mlflow.trackingUri }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
- name: MLFLOW_EXPERIMENT_NAME
  value: {{ $v.mlflow.experiment | quote }}
- name: SKINLESION_MLFLOW_MODEL
  value: {{ $v.mlflow.registeredModel | quote }}
{{- if $v.mlflow.existingSecret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $v.mlflow.existingSecret }}
      key: {{ $v.mlflow.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.mlflow.existingSecret }}
      key: {{ $v.mlflow.passwordKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* --- multi-worker training (stages.<stage>.workers > 1) --- */}}

{{/* The port the workers of a stage talk on (TF's gRPC). */}}
{{- define "skinlesion.workerPort" -}}2222{{- end }}

{{/*
stages.<stage>.workers (default 1); more than one only for the training stages, which
train together (MultiWorkerMirroredStrategy); other stages would do the same work twice.
(dict "root" $ "stage" "<stage>")
*/}}
{{- define "skinlesion.stageWorkers" -}}
{{- $workers := int ((index .root.Values.stages .stage).workers | default 1) }}
{{- if and (gt $workers 1) (not (has .stage (list "train" "finetune"))) }}
{{- fail (printf "stages.%s.workers: only train and finetune run on several workers" .stage) }}
{{- end }}
{{- $workers }}
{{- end }}

{{/* The headless Service that names a stage's worker pods. (dict "root" $ "stage" "x") */}}
{{- define "skinlesion.workersServiceName" -}}
{{- include "skinlesion.fullname" .root | trunc 44 | trimSuffix "-" }}-{{ .stage }}-workers
{{- end }}

{{/*
What a worker pod derives its TF_CONFIG from (skinlesion/train_cluster.py): the worker
count, the Service, the port and its Job's name; Kubernetes adds JOB_COMPLETION_INDEX.
(dict "root" $ "stage" "x" "workers" n)
*/}}
{{- define "skinlesion.workersEnv" -}}
- name: SKINLESION_WORKERS
  value: {{ .workers | quote }}
- name: SKINLESION_WORKER_SERVICE
  value: {{ include "skinlesion.workersServiceName" . }}
- name: SKINLESION_WORKER_PORT
  value: {{ include "skinlesion.workerPort" . | quote }}
- name: SKINLESION_STAGE_JOB
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['batch.kubernetes.io/job-name']
{{- end }}
