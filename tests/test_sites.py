import pytest
import torch
from transformers import DynamicCache

from esamp_pl.sites import OutputHead, SiteCapture, SitePair, decoder_stack


def _decode_positions(model, capture=None):
    """Prefill 2 rows then run 3 decode steps; yield (hidden_states, logits) of each decode step."""
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 5))
    cache = DynamicCache()
    out = model(input_ids=ids, cache=cache, use_cache=True, output_hidden_states=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(3):
        out = model(input_ids=token, cache=cache, use_cache=True, output_hidden_states=True)
        yield out
        token = out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def test_paper_sites_equal_hf_hidden_states_and_head_gives_logits(any_tiny_lm):
    tiny_lm = any_tiny_lm
    head = OutputHead(tiny_lm)
    with SiteCapture(tiny_lm, SitePair("paper")) as capture:
        for out in _decode_positions(tiny_lm):
            source, target = capture.pop()
            torch.testing.assert_close(source, out.hidden_states[1][:, -1], rtol=0, atol=0)
            torch.testing.assert_close(target, out.hidden_states[-1][:, -1], rtol=0, atol=0)
            torch.testing.assert_close(head.logits(target), out.logits[:, -1], rtol=1e-5, atol=1e-5)
            ids = torch.tensor([[3, 7, 100], [0, 255, 9]])
            torch.testing.assert_close(head.logits_at(target, ids), out.logits[:, -1].gather(1, ids),
                                       rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_tllm_sites_are_input_norm_outputs(any_tiny_lm):
    tiny_lm = any_tiny_lm
    layers, _ = decoder_stack(tiny_lm)
    seen = {}
    handles = [layers[0].input_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("s", o)),
               layers[-1].input_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))]
    with SiteCapture(tiny_lm, SitePair("tllm")) as capture:
        for _ in _decode_positions(tiny_lm):
            source, target = capture.pop()
            torch.testing.assert_close(source, seen["s"][:, -1], rtol=0, atol=0)
            torch.testing.assert_close(target, seen["t"][:, -1], rtol=0, atol=0)
    for h in handles:
        h.remove()


def test_capture_removes_its_hooks(tiny_llama):
    layers, norm = decoder_stack(tiny_llama)
    before = len(layers[0]._forward_hooks) + len(norm._forward_hooks)
    with SiteCapture(tiny_llama, SitePair()):
        assert len(layers[0]._forward_hooks) + len(norm._forward_hooks) == before + 2
    assert len(layers[0]._forward_hooks) + len(norm._forward_hooks) == before


def test_unknown_site_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown site preset 'deep'"):
        SitePair("deep")


@torch.no_grad()
def test_logits_on_a_vocabulary_wide_candidate_set_use_the_dense_head(tiny_llama, monkeypatch):
    """ESamp without a filter: the candidates are the whole vocabulary; no [rows, vocab, hidden] gather."""
    head = OutputHead(tiny_llama)
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.stack([torch.randperm(256, generator=torch.Generator().manual_seed(r)) for r in range(4)])
    largest = []
    original = torch.Tensor.index_select

    def spy(tensor, *args, **kwargs):
        out = original(tensor, *args, **kwargs)
        largest.append(out.numel())
        return out
    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    dense = head.logits(hidden)
    torch.testing.assert_close(head.logits_at(hidden, ids), dense.gather(1, ids), rtol=0, atol=0)
    assert max(largest, default=0) < 4 * 256 * 64
    few = ids[:, :3]  # a small candidate set still takes only its rows of the head
    torch.testing.assert_close(head.logits_at(hidden, few), dense.gather(1, few), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_logits_in_the_set_project_only_the_union_of_the_kept_tokens(tiny_llama, monkeypatch):
    head = OutputHead(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 64, generator=gen)
    shared = torch.randperm(256, generator=gen)[:12]  # rows of a prompt keep mostly the same tokens
    ids = torch.stack([shared[torch.randperm(12, generator=gen)] for _ in range(6)])
    keep = torch.arange(12).expand(6, 12) < torch.tensor([[3], [5], [12], [1], [7], [9]])
    selected = []
    original = torch.Tensor.index_select

    def spy(tensor, *args, **kwargs):
        out = original(tensor, *args, **kwargs)
        selected.append(out.shape[0])
        return out
    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    out = head.logits_in_set(hidden, ids, keep)
    dense = head.logits(hidden).gather(1, ids)
    torch.testing.assert_close(out[keep], dense[keep], rtol=1e-5, atol=1e-5)  # the kept ones, as the dense head
    assert selected == [torch.unique(ids[keep]).numel()] and selected[0] <= 12  # head rows of the union only
    assert torch.isfinite(out).all()  # outside the set: a finite stand-in (the row's first candidate)
    torch.testing.assert_close(out[~keep], dense[:, :1].expand(6, 12)[~keep], rtol=1e-5, atol=1e-5)
