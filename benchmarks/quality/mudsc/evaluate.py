"""Next-token metrics on non-overlapping blocks of the test stream.

For every model: mean token cross-entropy (nats), perplexity and top-1
next-token accuracy over all predicted positions (position t predicts token
t+1 within a block). The output ensemble averages the models' softmax
*probabilities* at every position: loss = -log(mean_i p_i(y)), prediction =
argmax of the mean.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence


def _summ(nll: float, correct: int, n: int) -> Dict[str, float]:
    loss = nll / max(1, n)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": correct / max(1, n), "tokens": n}


def evaluate_models(models: Sequence, data, batch_size: int = 16, ensemble: bool = True) -> Dict:
    """``models``: LlamaForCausalLM instances (eval mode); ``data``: (n, L)
    LongTensor. Returns {"models": [metrics per model], "ensemble": metrics}."""
    import torch

    nll = [0.0] * len(models)
    cor = [0] * len(models)
    e_nll, e_cor, n = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, data.shape[0], batch_size):
            x = data[i: i + batch_size]
            y = x[:, 1:]
            logps: List = []
            for k, m in enumerate(models):
                lp = torch.log_softmax(m(input_ids=x).logits[:, :-1].float(), dim=-1)
                nll[k] += float(-lp.gather(-1, y.unsqueeze(-1)).sum())
                cor[k] += int((lp.argmax(-1) == y).sum())
                if ensemble:
                    logps.append(lp)
            if ensemble and models:
                mix = torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(models))
                e_nll += float(-mix.gather(-1, y.unsqueeze(-1)).sum())
                e_cor += int((mix.argmax(-1) == y).sum())
            n += y.numel()
    out = {"models": [_summ(nll[k], cor[k], n) for k in range(len(models))]}
    if ensemble:
        out["ensemble"] = _summ(e_nll, e_cor, n)
    return out
