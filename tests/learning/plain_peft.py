"""A merged adapter dir used the way a user would, with nothing but transformers + PEFT (this file
imports no fednode): tests/learning/test_export.py loads it in process, and
tests/integration/own_data_checks.py runs this file in a fresh process (which then also shows that
fednode is not needed) to load it and generate:

    python tests/learning/plain_peft.py ADAPTER_DIR   -> one JSON line on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_both(adapter_dir: Path) -> tuple[PeftModel, PeftModel]:
    """The adapter on the base its adapter_config.json names, loaded by PeftModel and by AutoPeft (both eval)."""
    base_dir = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).eval()
    return plain, auto


def chat_and_generate(adapter_dir: Path) -> dict[str, object]:
    """Both loaders' largest logit difference on a chat prompt, and 12 greedy tokens from the plain one."""
    base_dir = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    plain, auto = load_both(adapter_dir)
    chat = [{"role": "user", "content": "How should I care for roses?"}]
    enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = plain.generate(**enc, max_new_tokens=12, do_sample=False)
        # compared in float64: in float32 the two loads differed by 0.0054 once under CI load (the
        # CPU kernels' reduction order depends on the threads they get), never in what they load
        same = float((plain.double()(**enc).logits - auto.double()(**enc).logits).abs().max())
    new = out[0][enc["input_ids"].shape[1]:]
    return {"same": same, "new_tokens": int(new.numel()), "text": tok.decode(new, skip_special_tokens=True),
            "fednode_imported": any(m.startswith("fednode") for m in sys.modules)}


if __name__ == "__main__":
    print(json.dumps(chat_and_generate(Path(sys.argv[1]))))
