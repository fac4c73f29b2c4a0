"""The second profile end to end on a tiny budget: SmolLM2-135M (converted once from GGUF into the
model cache, ~20 s the first time on a fresh machine) trains one LoRA step on fortunes."""

from __future__ import annotations

from fednode.learning import LocalTrainer, adapter_from_bytes, get_task


def test_smollm2_profile_trains_and_evaluates() -> None:
    task = get_task("smollm2-lm", batch_size=2, max_len=16, eval_batch_size=8, max_eval_samples=8)
    trainer = LocalTrainer(task, node_index=1, num_nodes=3, partition_scheme="dirichlet")
    assert (trainer.model_dir / "model.safetensors").is_file()
    layout = trainer.adapter_layout
    assert len(layout) == 240  # 30 layers x q/k/v/o x (A, B)
    assert {k.split(".")[-2] for k in layout} == {"lora_A", "lora_B"}
    before = trainer.evaluate(None)
    result = trainer.train(None, steps=1, learning_rate=1e-3, seed=0)
    state = adapter_from_bytes(result.delta_bytes)
    assert set(state) == set(layout)
    after = trainer.evaluate(result.delta_bytes)
    assert before["n"] == after["n"] == 8
    assert 0.0 < before["accuracy"] < 1.0 and before["loss"] > 0
    assert after["loss"] != before["loss"]
