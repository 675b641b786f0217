{{- /* Generated from skinlesion/stages.py STAGES by `make schema`: do not edit. */}}

{{/* The stages in run order, separated by spaces. */}}
{{- define "skinlesion.stageNames" -}}
prepare augment train finetune evaluate promote
{{- end }}

{{/* The jobs/ entrypoint of each stage. */}}
{{- define "skinlesion.stageEntrypoints" -}}
prepare: prepare
augment: augment
train: train
finetune: train
evaluate: evaluate
promote: promote
{{- end }}
