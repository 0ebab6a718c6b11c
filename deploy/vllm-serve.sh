#!/bin/sh
# Starts vLLM's OpenAI-compatible server for the fine-tuned adapters (docker-compose.yml, profile gpu).
# - The serving key: SERVING_API_KEY when set, else derived from ADMIN_TOKEN exactly as shared/serving.py
#   derives it (the router and the finetune service derive the same key), so no extra secret is needed.
# - Runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): the finetune service loads every registered
#   adapter through /v1/load_lora_adapter, at its start and whenever vLLM comes back after a restart.
# - --max-lora-rank covers every adapter a recipe may train (services/finetune/training.py MAX_SERVED_LORA_RANK).
# `sh vllm-serve.sh --print-key` prints the key and exits (tests compare it with shared/serving.py).
set -eu
KEY="${SERVING_API_KEY:-}"
if [ -z "$KEY" ]; then
  KEY=$(python3 -c 'import hashlib, hmac, os; print("sk-" + hmac.new(os.environ["ADMIN_TOKEN"].encode(), b"selflearn:serving-key", hashlib.sha256).hexdigest()[:40])')
fi
if [ "${1:-}" = "--print-key" ]; then
  echo "$KEY"
  exit 0
fi
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
exec python3 -m vllm.entrypoints.openai.api_server \
  --model "${VLLM_BASE_MODEL:-/models/base}" \
  --served-model-name "${VLLM_SERVED_NAME:-base}" \
  --host 0.0.0.0 --port 8001 \
  --api-key "$KEY" \
  --enable-lora \
  --max-lora-rank "${VLLM_MAX_LORA_RANK:-64}" \
  --max-loras "${VLLM_MAX_LORAS:-4}" \
  --max-model-len "${VLLM_MAX_MODEL_LEN:-4096}" \
  "$@"
