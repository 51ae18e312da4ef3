"""SFT (LoRA by default) of a downloaded Hugging Face Llama / Qwen2 / Qwen3 checkpoint, exported back to the
Hugging Face format at the end. See docs/pretrained.md.

    python -m experiments.sft_pretrained --workdir runs/qwen_sft \\
        --config.init_from=checkpoints/Qwen2.5-0.5B-Instruct --config.train_jsonl=data/train.jsonl

`init_from` is a local directory (config.json, *.safetensors, tokenizer.json); nothing is downloaded. The model
config and the tokenizer come from it; bfloat16 compute with float32 master weights; held-out accuracy on the
built-in arithmetic task before and after. `--config.lora.rank=0` trains every weight instead.
"""

from jaxpost import cli
from jaxpost.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxpost.models.lora import LoRAConfig
from jaxpost.recipes import sft
from jaxpost.config import EvalConfig

CONFIG = sft.SFTConfig(
    steps=500,
    init_from="",  # required: the checkpoint directory
    model=ModelConfig(dtype="bfloat16", param_dtype="float32", remat=True),  # shapes come from init_from
    lora=LoRAConfig(rank=16, alpha=32.0, dropout=0.05),
    export_hf=True,
    data=DataConfig(seq_len=2048, batch_size=16),
    optim=OptimConfig(lr=1e-4, warmup_steps=25, weight_decay=0.0),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    train=TrainConfig(log_every=10, checkpoint_every=100, eval_every=100),
    eval=EvalConfig(n_examples=200, batch_size=50, max_prompt_len=128, max_new_tokens=24),
)


def main(cfg: sft.SFTConfig, workdir: str):
    if not cfg.init_from:
        raise SystemExit("experiments.sft_pretrained needs --config.init_from=DIR (a Hugging Face model directory "
                         "with config.json, *.safetensors and tokenizer files; see docs/pretrained.md)")
    return sft.run(cfg, workdir)


if __name__ == "__main__":
    cli.run(main, CONFIG, default_workdir="runs/sft_pretrained")
