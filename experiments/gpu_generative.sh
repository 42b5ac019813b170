#!/usr/bin/env bash
# GPU check of the generative path, in process (no Ray needed): fit the VAE and the GAN on
# train.device=cuda, then meta-train ProtoNet on LASIUM-N tasks from the VAE for MINUTES
# minutes and evaluate 5-way 1-shot on the test characters. Usage: bash experiments/gpu_generative.sh OUT [MINUTES]
set -euo pipefail
out=${1:?usage: gpu_generative.sh OUT [MINUTES]}; minutes=${2:-3}
py=${PYTHON:-python3}
cfg=experiments/omniglot_lasium_protonet.yaml
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for model in vae gan; do
  lr=$([ $model = gan ] && echo 0.0002 || echo 0.001)
  t=$SECONDS
  $py -m metassl.cli fit-generative $cfg --backend local --run-dir "$out/$model" \
    --set train.device=cuda --set generator.generative.model=$model --set generator.generative.lr=$lr --json 2>&1 | tail -3
  echo "$model fit wall $((SECONDS - t)) s"
done
t=$SECONDS
$py -m metassl.cli train $cfg --backend local --run-dir "$out/protonet" \
  --set train.device=cuda --set generator.actors=0 --set generator.generative.checkpoint="$out/vae" \
  --set train.max_minutes=$minutes --set train.val_every=250 2>&1 | grep -E "step [0-9]+/|meta-val|test|stopping"
echo "meta-train + eval wall $((SECONDS - t)) s"
