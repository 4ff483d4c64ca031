"""How far the on-the-spot check's two numbers lie apart on the tested families: the worst |AttnScore - eager prompt
mass| per family over right-padded, left-padded and packed rows and both layers, in fp32 and bf16. This is what the
check's tolerances (`sstoken_trl.scoring.check.TOLERANCE`) are set against:

    PYTHONPATH=$PWD python tests/scripts/check_agreement.py
"""

from __future__ import annotations

import torch

from sstoken_trl.adapters import attention_modules
from sstoken_trl.scoring import check
from sstoken_trl.scoring.hook import AttnScoreHook
from sstoken_trl.scoring.layout import batch_layout
from tests.families import FAMILY_CONFIGS, build_family_model
from tests.test_attn_score import LAYOUTS, VOCAB, make_batch

SKIP = {("gpt_oss", "packed")}  # transformers' GPT-OSS eager mask mixes packed documents (see docs/models.md)


def worst_difference(model_type: str, dtype: torch.dtype) -> float:
    model = build_family_model(model_type, VOCAB).to(dtype).eval()
    worst = 0.0
    for layout_name in LAYOUTS:
        if (model_type, layout_name) in SKIP:
            continue
        inputs, labels = make_batch(layout_name)
        for layer in (0, 1):
            hook = AttnScoreHook(attention_modules(model)[layer], "sdpa", layer)
            hook.check_pending = True
            hook.arm(batch_layout(labels, inputs.get("attention_mask"), inputs.get("position_ids")))
            with torch.no_grad():
                model(**inputs, use_cache=False)
            hook.take()
            hook.remove()
            worst = max(worst, hook.check_result.max_diff)
    return worst


def main() -> None:
    torch.set_num_threads(1)
    check.TOLERANCE = {dtype: float("inf") for dtype in check.TOLERANCE}  # measure, do not stop
    check.logger.disabled = True
    for dtype in (torch.float32, torch.bfloat16):
        figures = {model_type: worst_difference(model_type, dtype) for model_type in FAMILY_CONFIGS}
        worst = max(figures, key=figures.get)
        print(f"{dtype}: worst {figures[worst]:.1e} ({worst}) over {len(figures)} families")
        print("  " + ", ".join(f"{name} {value:.1e}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
