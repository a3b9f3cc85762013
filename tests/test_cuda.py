"""The CUDA path: bf16 autocast training, fp16 with a grad scaler, KV-cache decoding, LoRA on cuDNN LSTMs.

Marked `cuda` and skipped without a GPU; `pytest -m cuda` runs only these (scripts/gpu_check.py
covers speed). They use tiny models, so they take seconds on any card.
"""

from __future__ import annotations

import pytest
import torch
from conftest import config_from_dict, load_run

from lmzoo.config.schema import FinetuneConfig, RunConfig
from lmzoo.device import pick_precision
from lmzoo.models import build_model
from lmzoo.models.peft import apply_finetune
from lmzoo.training.loop import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXT = "".join(f"the quick brown fox {i % 7} jumps over the lazy dog\n" for i in range(400))


def tiny_gpt_config(tmp_path, precision: str) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return config_from_dict(
        {
            "name": f"gpt-{precision}",
            "out_dir": str(tmp_path / "runs"),
            "data": {"train": str(corpus), "batch_size": 8, "seq_len": 32},
            "model": {"name": "gpt", "d_model": 32, "n_heads": 2, "n_layers": 2, "context_length": 32},
            "train": {
                "max_steps": 60,
                "eval_every": 30,
                "log_every": 1,
                "lr": 3e-3,
                "warmup_steps": 5,
                "device": "cuda",
                "precision": precision,
            },
        }
    )


def test_auto_precision_on_cuda_is_bf16_where_supported():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert pick_precision(torch.device("cuda"), "auto") == expected


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_on_cuda_lowers_the_loss_and_checkpoints_load_on_cpu(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("card without bf16")
    losses = []
    run_dir = train(
        tiny_gpt_config(tmp_path, precision), progress=False, on_step=lambda s, loss: losses.append(loss)
    )
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    state = torch.load(run_dir / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert (state["scaler"] is not None) == (precision == "fp16")  # fp16 keeps its GradScaler state
    run = load_run(run_dir, device="cpu")
    assert next(run.model.parameters()).device.type == "cpu"


def test_kv_cache_decoding_equals_full_forward_on_cuda():
    torch.manual_seed(0)
    model = build_model({"name": "gpt", "d_model": 32, "n_heads": 2, "n_layers": 2, "context_length": 16}, 40)
    model = model.cuda().eval()
    ids = torch.randint(4, 40, (1, 30), device="cuda")
    with torch.no_grad():
        state = model.init_state(1)
        logits, state = model(ids[:, :4], state)
        for t in range(4, 30):
            step, state = model(ids[:, t : t + 1], state)
            full, _ = model(state.ids)
            assert torch.allclose(step[:, -1], full[:, -1], atol=1e-4)


def test_lora_on_cudnn_lstm_trains_only_the_update():
    torch.manual_seed(0)
    model = build_model(
        {"name": "lstm", "embedding_dim": 16, "hidden_size": 32, "num_layers": 2, "dropout": 0.0}, 30
    ).cuda()
    ids = torch.randint(4, 30, (3, 12), device="cuda")
    base, _ = model(ids)
    apply_finetune(model, FinetuneConfig(method="lora", targets=["*weight_ih*", "*weight_hh*"]))
    assert torch.allclose(model(ids)[0], base, atol=1e-5)  # B = 0: the base model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss, _ = model(ids, targets=ids)
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    assert not torch.allclose(model(ids)[0], base, atol=1e-4)
