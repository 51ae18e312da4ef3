"""Post-training a downloaded checkpoint end to end: a Hugging Face Qwen3 directory (random weights saved by
transformers, a tokenizer.json with a ChatML template trained on the task) -> LoRA SFT with the recipe -> export ->
transformers loads the export and agrees with jaxpost -> LoRA DPO from that SFT workdir with the base model as its
reference."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxpost.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from jaxpost.data import make_task  # noqa: E402
from jaxpost.models import LM, from_pretrained  # noqa: E402
from jaxpost.models.hf import logits as jaxpost_logits  # noqa: E402
from jaxpost.models.lora import LoRAConfig, adapter_params, base_params, load_adapters  # noqa: E402
from jaxpost.recipes import dpo, sft  # noqa: E402
from jaxpost.config import EvalConfig  # noqa: E402
from jaxpost.tokenizers import HFTokenizer, load_tokenizer  # noqa: E402
from jaxpost.checkpoint import Checkpointer  # noqa: E402
from jaxpost.train.state import with_shardings  # noqa: E402
from tests.helpers import max_abs_diff, single_device_mesh  # noqa: E402
from tests.test_hf_tokenizer import QWEN_SPECIALS, SPLIT_PATTERN  # noqa: E402

# ChatML (Qwen's layout) without a default system prompt, so that the task's prompts stay short.
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

EVAL = EvalConfig(n_examples=8, batch_size=8, max_prompt_len=48, max_new_tokens=6)
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down"))


def _tokenizer_json(task) -> tokenizers.Tokenizer:
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(task.corpus(2000), trainer)
    tk.add_special_tokens(QWEN_SPECIALS)
    return tk


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 'downloaded' Qwen3 checkpoint: config.json + model.safetensors + tokenizer files."""
    path = tmp_path_factory.mktemp("qwen3_download")
    task = make_task("arithmetic")
    tk = _tokenizer_json(task)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    hf_cfg = transformers.Qwen3Config(
        vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=True, eos_token_id=tk.token_to_id("<|im_end|>"),
        rope_parameters=dict(rope_type="default", rope_theta=1e6))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sft_run(hf_dir, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("sft_lora"))
    cfg = sft.SFTConfig(steps=4, init_from=hf_dir, lora=LORA, export_hf=True, seed=0,
                        model=ModelConfig.tiny(),  # replaced by the checkpoint's config (dtypes kept)
                        data=DataConfig(seq_len=64, batch_size=8), optim=OptimConfig(lr=1e-2, warmup_steps=0),
                        mesh=MeshConfig(data=2, fsdp=2, tensor=2),
                        train=TrainConfig(log_every=1, checkpoint_every=4, async_checkpoints=False), eval=EVAL)
    return cfg, work, sft.run(cfg, work)


def test_lora_sft_from_a_hugging_face_checkpoint(hf_dir, sft_run):
    cfg, work, res = sft_run
    # the recorded config is the checkpoint's model, so DPO / RL starts rebuild the same model
    with open(os.path.join(work, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["d_model"] == 32 and saved["model"]["qk_norm"] and saved["model"]["tie_embeddings"]
    model_cfg = ModelConfig(**saved["model"])
    lm = LM(model_cfg, LORA)
    assert res["n_trained_params"] == sum(x.size for x in jax.tree.leaves(adapter_params(lm.abstract_params)))
    assert isinstance(load_tokenizer(work), HFTokenizer)  # the checkpoint's tokenizer, saved into the workdir
    losses = [json.loads(line)["loss"] for line in open(os.path.join(work, "metrics.jsonl")) if '"loss"' in line]
    assert len(losses) == 4 and losses[-1] < losses[0]

    mesh = single_device_mesh()
    ckpt = Checkpointer(os.path.join(work, "checkpoints"), async_save=False)
    trained = ckpt.restore_params(4, with_shardings(lm.abstract_params, lm.param_shardings(mesh)))
    ckpt.close()
    downloaded, _ = from_pretrained(hf_dir, mesh=mesh)
    assert max_abs_diff(base_params(trained), downloaded.params) == 0.0  # the base stayed frozen
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(adapter_params(trained))) > 0

    # the export: merged weights that transformers loads and evaluates like jaxpost's adapter model
    export = os.path.join(work, "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(export))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export, local_files_only=True, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        hf_logits = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(lm.logits(trained, tokens))
    np.testing.assert_allclose(hf_logits, ours, atol=1e-4)
    exported, _ = from_pretrained(export, mesh=mesh)
    np.testing.assert_allclose(np.asarray(jaxpost_logits(exported, tokens)), ours, atol=1e-5)
    # the adapters alone
    loaded, lora_cfg = load_adapters(os.path.join(work, "adapters"), downloaded.params)
    assert lora_cfg == LORA and max_abs_diff(loaded, trained) == 0.0


def test_lora_dpo_from_the_lora_sft_workdir_uses_the_base_as_reference(sft_run, tmp_path):
    _, sft_work, _ = sft_run
    cfg = dpo.DPOConfig(steps=2, init_from=sft_work, pairs="near_miss", n_prompts=16, reference="model",
                        lora=LoRAConfig(rank=2, alpha=4.0), data=DataConfig(seq_len=48, batch_size=4),
                        optim=OptimConfig(lr=1e-2, warmup_steps=0), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
                        train=TrainConfig(log_every=1, checkpoint_every=2, async_checkpoints=False),
                        eval=EvalConfig(n_examples=0))
    res = dpo.run(cfg, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in records] == [1, 2]
    # fresh adapters on the merged SFT model: the policy starts at the reference, so the first loss is log 2
    assert abs(records[0]["loss"] - np.log(2)) < 1e-5
    assert res["steps"] == 2
