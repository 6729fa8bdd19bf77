"""The Model Runner V2 adapter on the CPU: MRV2's own classes where they run without CUDA, fakes of the rest.

MRV2 refuses to start without Triton ("Model Runner V2 requires Triton", vllm/config/vllm.py), and its
``RequestState`` allocates pinned memory (vllm/v1/worker/gpu/buffer_utils.py), so no MRV2 step can run
here. These tests drive the plugin's MRV2 path the way vLLM 0.32 does: its real loader and params
validator, a real ``InputBatch`` (vllm/v1/worker/gpu/input_batch.py) and ``LogitsProcRequestState``, and a
stand-in runner with the two methods the adapter wraps, with the signatures of
vllm/v1/worker/gpu/model_runner.py (``sample`` line 1592, ``finish_requests`` line 1152).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("vllm.sampling_params")  # the real vLLM, not this folder as a namespace package
gpu_batch = pytest.importorskip("vllm.v1.worker.gpu.input_batch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.worker.gpu import model_runner as mrv2  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    LogitsProcRequestState,
    build_custom_logits_processors_params_validator,
)

from esamp_pl.sampling import SamplingParams as EsampParams  # noqa: E402
from esamp_pl.sampling import select_candidates  # noqa: E402
from esamp_pl.vllm import mrv2_runner  # noqa: E402
from esamp_pl.vllm.capture import VllmStateCapture  # noqa: E402
from esamp_pl.vllm.options import PluginSettings  # noqa: E402
from esamp_pl.vllm.processor import ESampLogitsProcessor  # noqa: E402
from esamp_pl.vllm.runtime import ESampRuntime, output_head  # noqa: E402
from esamp_pl.vllm.v1_runner import RunnerBinding  # noqa: E402

HIDDEN, VOCAB, SLOTS = 8, 30, 8


class _Layer(nn.Module):
    """A vLLM-style decoder layer: returns (hidden, residual) with the residual add deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.proj(x), x


class _Norm(nn.Module):
    def forward(self, hidden, residual):
        return torch.tanh(hidden + residual), hidden + residual


class _TinyVllmModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer()])
        self.model.norm = _Norm()

    def forward(self, x):
        hidden, residual = self.model.layers[0](x)
        return self.model.norm(hidden, residual)[0]


class _StandInRunner:
    """The two MRV2 ``GPUModelRunner`` methods the adapter wraps, reduced to what they do around it."""

    def __init__(self, sampler_apply) -> None:
        self.sampler_apply = sampler_apply
        self.removed: list[str] = []

    def sample(self, hidden_states, input_batch, grammar_output):  # model_runner.py: Sampler -> processors
        logits = hidden_states[input_batch.logits_indices] @ HEAD.T
        return self.sampler_apply(logits.clone(), input_batch), logits

    def finish_requests(self, scheduler_output):  # model_runner.py: finished and preempted leave req_states
        self.removed += sorted(scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids)


HEAD = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
mrv2_runner.wrap_runner_class(_StandInRunner)


def test_wrapped_methods_have_mrv2s_signatures():
    # If vLLM changes these, the wraps in mrv2_runner no longer fit and this fails.
    assert list(inspect.signature(mrv2.GPUModelRunner.sample).parameters) == [
        "self", "hidden_states", "input_batch", "grammar_output"]
    assert list(inspect.signature(mrv2.GPUModelRunner.finish_requests).parameters) == ["self", "scheduler_output"]
    fields = set(gpu_batch.InputBatch.__dataclass_fields__)
    assert {"req_ids", "num_reqs", "idx_mapping_np", "is_prefilling_np", "num_scheduled_tokens",
            "cu_num_logits_np", "logits_indices"} <= fields
    mrv2_runner.install()
    for name in ("load_model", "sample", "finish_requests"):
        assert getattr(mrv2.GPUModelRunner, name)._esamp_wrapped, name


def test_mrv2s_loader_accepts_the_processor_and_validates_requests():
    validate = build_custom_logits_processors_params_validator(None)  # loads the entry points, as the server
    validate(SamplingParams(extra_args={"esamp_beta": 0.25}))
    with pytest.raises(VLLMValidationError, match="esamp_beta"):
        validate(SamplingParams(extra_args={"esamp_beta": -1}))
    v1 = ESampLogitsProcessor(None, torch.device("cpu"), False)
    assert not v1.mrv2 and not v1.is_argmax_invariant()
    assert _processor().mrv2


def _processor() -> ESampLogitsProcessor:
    state = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=VOCAB,
                                   all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None)
    return ESampLogitsProcessor(None, state)


def _input_batch(req_ids, slots, scheduled, prefilling) -> gpu_batch.InputBatch:
    """A real MRV2 InputBatch: requests in batch order, each with one logits row at its last token."""
    num_reqs = len(req_ids)
    scheduled = np.array(scheduled, dtype=np.int32)
    query_start = np.concatenate([[0], np.cumsum(scheduled)]).astype(np.int32)
    num_tokens = int(query_start[-1])
    slots_np = np.array(slots, dtype=np.intp)
    prefilling = np.array(prefilling, dtype=bool)
    cu_logits = np.arange(num_reqs + 1, dtype=np.int32)
    return gpu_batch.InputBatch(
        req_ids=list(req_ids), num_reqs=num_reqs, num_reqs_after_padding=num_reqs,
        idx_mapping=torch.from_numpy(slots_np).long(), idx_mapping_np=slots_np,
        expanded_idx_mapping=torch.from_numpy(slots_np).long(),
        expanded_local_pos=torch.zeros(num_reqs, dtype=torch.int32), num_scheduled_tokens=scheduled,
        num_tokens=num_tokens, num_tokens_after_padding=num_tokens, num_draft_tokens=0,
        num_draft_tokens_per_req=None, query_start_loc=torch.from_numpy(query_start), query_start_loc_np=query_start,
        seq_lens=torch.from_numpy(query_start[1:] - query_start[:-1]), seq_lens_cpu_upper_bound=torch.zeros(num_reqs),
        dcp_local_seq_lens=None, num_computed_tokens_np=np.zeros(num_reqs, dtype=np.int32),
        prefill_len_np=np.zeros(num_reqs, dtype=np.int32), num_computed_prefill_tokens_np=np.zeros(num_reqs, np.int32),
        is_prefilling_np=prefilling, has_prefill=bool(prefilling.any()), decode_graph_eligible=not prefilling.any(),
        input_ids=torch.zeros(num_tokens, dtype=torch.int32), positions=torch.zeros(num_tokens, dtype=torch.int64),
        is_padding=torch.zeros(num_tokens, dtype=torch.bool),
        logits_indices=torch.from_numpy(query_start[1:] - 1).long(),
        cu_num_logits=torch.from_numpy(cu_logits), cu_num_logits_np=cu_logits, has_structured_output_reqs=False,
        prompt_lens=None)


@pytest.fixture
def attached(monkeypatch):
    """A stand-in runner bound to a capture on a tiny vLLM-style model and a real ESamp runtime."""
    model = _TinyVllmModel()
    processor = _processor()
    runner = _StandInRunner(lambda logits, batch: processor.apply(logits, _context(batch)))
    capture = VllmStateCapture(model, max_tokens=16, hidden_size=HIDDEN, dtype=torch.float32, device="cpu")
    runtime = ESampRuntime(PluginSettings(rank=4, record_steps=64), head=output_head(HEAD), hidden_size=HIDDEN,
                           device="cpu", initial_state=lambda init: None)
    binding = RunnerBinding(view=mrv2_runner.Mrv2RunnerView(runner), capture=capture, runtime=runtime)
    monkeypatch.setattr(mrv2_runner, "_BINDING", binding)
    return SimpleNamespace(model=model, processor=processor, runner=runner, runtime=runtime, view=binding.view)


def _context(batch) -> LogitsContext:
    return LogitsContext(expanded_idx_mapping=batch.expanded_idx_mapping, idx_mapping=batch.idx_mapping,
                         idx_mapping_np=batch.idx_mapping_np, expanded_local_pos=batch.expanded_local_pos,
                         input_ids=batch.input_ids, pos=batch.positions,
                         seq_lens_upper_bound_np=batch.seq_lens_cpu_upper_bound.numpy())


def _step(attached, batch, generator):
    tokens = torch.randn(batch.num_tokens, HIDDEN, generator=generator)
    with torch.no_grad():
        hidden = attached.model(tokens)
        block0 = sum(attached.model.model.layers[0](tokens))  # hidden + residual: HF's hidden_states[1]
        processed, logits = attached.runner.sample(hidden, batch, None)
    return processed, logits, block0, hidden


def test_mrv2_step_draws_for_esamp_decode_rows_only(attached):
    esamp = SamplingParams(min_p=0.1, seed=3, extra_args={"esamp_beta": 0.5})
    assert attached.processor.add_request(5, esamp) and attached.processor.add_request(2, esamp)
    assert not attached.processor.add_request(7, SamplingParams(min_p=0.1))  # no esamp_* keys: untouched
    assert attached.processor.add_request(1, esamp)
    # MRV2 sorts decodes first: samples 0 and 1 of request p, a plain request q, then ESamp request r's
    # prefill of a one-token prompt (one token, like a decode, but it samples r's first token: vLLM's draw)
    batch = _input_batch(["0_p", "q", "1_p", "r"], slots=[5, 7, 2, 1], scheduled=[1, 1, 1, 1],
                         prefilling=[False, False, False, True])
    processed, logits, block0, hidden = _step(attached, batch, torch.Generator().manual_seed(1))

    assert attached.view.batch is None  # held only while sampling
    for row in (0, 2):  # ESamp decode rows: only the drawn token is left, inside the request's candidates
        finite = torch.isfinite(processed[row]).nonzero().flatten()
        candidates = select_candidates(logits[row:row + 1], EsampParams(min_p=0.1))
        assert finite.numel() == 1 and finite.item() in candidates.token_ids[0][candidates.keep[0]].tolist()
    assert torch.equal(processed[[1, 3]], logits[[1, 3]])  # the plain request and the prefilling ESamp request
    records = {r["request_id"]: r for r in attached.runtime.records}
    assert set(records) == {"0_p", "1_p"}
    for request_id, token_row in (("0_p", 0), ("1_p", 2)):  # states of the row's own token in the forward
        assert torch.allclose(records[request_id]["source"], block0[token_row], atol=1e-6)
        assert torch.allclose(records[request_id]["target"], hidden[token_row], atol=1e-6)
    members = attached.runtime.members
    assert (members["0_p"].group, members["0_p"].slot, members["1_p"].slot) == ("request:p", 0, 1)
    stats = attached.runtime.stats()
    assert (stats["esamp_decode_rows"], stats["groups_created"], stats["distiller_updates"]) == (2, 1, 1)


def test_preempted_samples_keep_their_group_and_finished_ones_free_it(attached):
    esamp = SamplingParams(min_p=0.1, seed=4, extra_args={"esamp_beta": 0.25})
    attached.processor.add_request(0, esamp)
    attached.processor.add_request(1, esamp)
    generator = torch.Generator().manual_seed(2)
    _step(attached, _input_batch(["0_p", "1_p"], [0, 1], [1, 1], [False, False]), generator)
    attached.runner.finish_requests(SimpleNamespace(finished_req_ids={"0_p"}, preempted_req_ids={"1_p"}))
    assert attached.runner.removed == ["0_p", "1_p"] and set(attached.runtime.members) == {"1_p"}
    assert attached.runtime.stats()["groups_freed"] == 0
    # 1_p resumes in another slot: it re-runs its prompt and output (plain draw), then decodes in its group
    attached.processor.add_request(6, esamp)
    _step(attached, _input_batch(["1_p"], [6], [5], [True]), generator)
    _step(attached, _input_batch(["1_p"], [6], [1], [False]), generator)
    group = attached.runtime.bank.groups["request:p"]
    assert group.steps == 2 and attached.runtime.stats()["distiller_updates"] == 2
    attached.runner.finish_requests(SimpleNamespace(finished_req_ids={"1_p"}, preempted_req_ids=set()))
    stats = attached.runtime.stats()
    assert (stats["live_groups"], stats["groups_freed"], stats["live_members"]) == (0, 1, 0)


def test_profiling_runs_of_the_sampler_are_left_alone(attached):
    attached.processor.add_request(0, SamplingParams(extra_args={"esamp_beta": 0.25}))
    batch = _input_batch(["0_p"], [0], [1], [False])
    logits = torch.randn(1, VOCAB)
    # MRV2's _dummy_sampler_run calls the sampler directly, not GPUModelRunner.sample: no batch is held
    assert torch.equal(attached.processor.apply(logits.clone(), _context(batch)), logits)
    assert attached.runtime.stats()["esamp_decode_rows"] == 0


def test_token_rows_come_from_the_batchs_logits_indices():
    # Without draft tokens MRV2 puts decodes first, so their token rows equal their logits rows; the index
    # still comes from logits_indices, which is right for any order.
    batch = _input_batch(["a", "b"], slots=[0, 1], scheduled=[3, 1], prefilling=[True, False])
    assert mrv2_runner.token_index(batch, [1]).tolist() == [3]
    assert mrv2_runner.decode_rows(batch, {0, 1}) == [(1, "b", 1)]
