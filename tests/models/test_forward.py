"""The one whole-model forward (models/forward.py) is each family model's own forward, and the
batch's modality codes may relabel text tokens only."""

import numpy as np
import pytest
from flax import nnx

from splitq_jax.models import forward, llava, qwen2_5_vl
from splitq_jax.modality import ANSWER, TEXT, VISION
from splitq_jax.models.family import family_of
from test_cli import llava_tiny_batches
from test_pipeline import tiny_batches as qwen_tiny_batches

CASES = {
    "qwen2_5_vl": (lambda: qwen2_5_vl.Qwen2_5_VL(qwen2_5_vl.get_config("qwen2.5-vl-tiny"), rngs=nnx.Rngs(0)),
                   qwen_tiny_batches),
    "llava": (lambda: llava.Llava(llava.get_config("llava-1.5-tiny"), rngs=nnx.Rngs(0)), llava_tiny_batches),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_forward_is_the_models_own_forward(family):
    make, batches = CASES[family]
    model = make()
    batch = batches(model.config)[0]
    got = np.asarray(forward.logits(model, family, batch))
    ref = np.asarray(model(*family_of(family, model.config).model_args(batch)))
    valid = np.asarray(batch["attention_mask"], bool)
    np.testing.assert_allclose(got[valid], ref[valid], rtol=1e-5, atol=1e-5 * np.abs(ref[valid]).max())
    # blocks are pluggable: a runner that skips every block gives the head of the embeddings
    skip = np.asarray(forward.logits(model, family, batch, blocks=lambda x, *_: x))
    inp = forward.prepare(model, family, batch)
    np.testing.assert_allclose(skip, np.asarray(model.head(inp.hidden)), rtol=1e-6, atol=1e-6)

    # answer tokens may be relabelled; a pad or an image placeholder may not
    mod = np.asarray(inp.modality).copy()
    text = np.argwhere(mod == TEXT)
    mod[tuple(text[-1])] = ANSWER
    relabelled = forward.prepare(model, family, dict(batch, modality=mod))
    assert int(relabelled.modality[tuple(text[-1])]) == ANSWER
    bad = mod.copy()
    bad[tuple(np.argwhere(mod == VISION)[0])] = TEXT
    with pytest.raises(ValueError, match="disagree with the model's padding or image placeholders"):
        forward.prepare(model, family, dict(batch, modality=bad))
