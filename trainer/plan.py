"""`keel plan`: what a recipe will do on a given cluster, and whether it fits in GPU memory,
before any machine starts. Reads the model's config.json only: parameters are counted from its
numbers for each architecture Keel knows (trainer/models/parameters.py; no torch, no weights).

The memory model, per device, in bytes (P: parameters, T: trainable parameters, N: devices the
strategy shards over):

    weights      trainable and frozen parameters as Keel holds them (trainer/models/loading.py):
                 trained weights in fp32 under the Trainer's bf16 autocast (ddp, fsdp2) or CPU
                 fp32; bf16 with an fp32 master copy under DeepSpeed bf16 (counted with the
                 optimizer); a frozen LoRA base in bf16 on GPUs; 4-bit NF4 (+ scales) for QLoRA
    gradients    one per trainable parameter (fp32; bf16 under DeepSpeed bf16)
    optimizer    AdamW: two fp32 moments per trainable parameter (+ the fp32 master copy under
                 DeepSpeed bf16)
    activations  per layer and token, what backward keeps: about 8*hidden + 4*intermediate
                 values (attention scores are never materialised with SDPA/flash attention); with
                 gradient checkpointing, each layer's input plus one layer recomputed at a time;
                 plus the logits and their gradient in fp32 (2*vocab per token) which dominate
                 for large vocabularies. Models with attention sinks (gpt-oss) train with eager
                 attention, which materialises every layer's scores: seq^2 x heads per sequence
                 and layer, kept for backward (the softmax output), and about three such matrices
                 live while one layer runs (scores, scores with the sink column, probabilities)
    reference    DPO's frozen reference copy (none with peft: the base with adapters disabled)
    overhead     CUDA context, NCCL buffers and allocator fragmentation: 2 GiB + 5%

ZeRO-1 shards the optimizer, ZeRO-2 also gradients (plus DeepSpeed's reduce bucket: up to one
more copy of the gradients), ZeRO-3 and FSDP2 everything (plus the gathered weights: ~2 layers
under FSDP2; under DeepSpeed up to stage3_max_live_parameters, 1e9, so models under 1e9
parameters stay whole); offload moves optimizer (and parameters) to CPU.

`--gpu cpu` plans a CPU run (fp32 throughout, DDP's gradient buckets, DeepSpeed's fp32 master
partition, no CUDA context): that model is calibrated against measured peak RSS under torchrun
with glibc malloc's default settings, as `keel train` runs (benchmarks/plan_calibration.py,
results in benchmarks/results/plan_calibration.md). There, RSS also holds freed blocks malloc
keeps in its heap (its dynamic mmap threshold): the plan counts a fitted share (CPU_HEAP_KEPT)
of what backward frees, less the gradients it makes. The GPU figures are the same arithmetic
in bf16 without that heap term, and have not been measured on GPUs.

Gradients and activations: under DDP and FSDP2 with one micro-batch per step, .grad tensors are
made as backward frees the activations and freed after the optimizer step, so only the larger of
the two counts at the peak.

Step time: training FLOPs per token as the tracker's MFU counts them (trainer/models/flops.py: 6
per trained and 4 per frozen active parameter), plus gradient checkpointing's recomputed forward,
DPO's reference forward and causal attention, at an assumed 40% MFU of the GPU's dense bf16 peak
(the same table), plus the strategy's collectives, not overlapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainer.models.config import has_attention_sinks, is_mxfp4
from trainer.models.flops import PEAK_BF16_FLOPS, training_flops_per_token
from trainer.models.parameters import active_parameters, experts_and_top_k, parameter_counts, text_config

GIB = 1024**3
# usable memory as torch reports it, per GPU kind
GPUS = {
    "h100-80gb": 79.2, "h200-141gb": 139.8, "a100-80gb": 79.2, "a100-40gb": 39.4, "l40s-48gb": 44.4,
    "a10g-24gb": 22.0, "l4-24gb": 22.0, "b200-180gb": 178.0,
}
OVERHEAD_FIXED = 2 * GIB
OVERHEAD_FRACTION = 0.05
NF4_BYTES = 0.5 + 0.5 / 64 * 2  # 4-bit values plus double-quantised block scales
# CPU runs keep memory no tensor uses: glibc malloc serves activation-sized blocks from its heap
# (its mmap threshold rises to the largest block freed) and keeps what is freed there, below live
# blocks, resident. Backward frees the activations (and, under DeepSpeed ZeRO-3, the parameters
# it gathered); the gradients backward makes reuse some of those holes. The plan counts
# CPU_HEAP_KEPT of the freed bytes, less the gradients, as kept: a share fitted to the calibration
# matrix (benchmarks/results/plan_calibration.md, where the measured shares were 0.54-0.71 at
# 100M parameters). Beside it, DeepSpeed's engine (buckets, partition bookkeeping) adds a constant
# fitted to the tiny model's full zero3 run. (A runtime constant fitted the same way to its ddp
# run comes out at 0 once the heap is counted.)
CPU_HEAP_KEPT = 0.54
CPU_DEEPSPEED_RUNTIME = 60 * 1024**2
# DeepSpeed's defaults, which Keel's config leaves in place (trainer/parallel.py)
ZERO3_MAX_LIVE_PARAMS = 10**9
ZERO_REDUCE_BUCKET = 5 * 10**8
# GRPO's rollouts through TRL's colocated vLLM (trainer/techniques/grpo.py): vLLM reserves this
# share of each GPU for its weights and KV cache for the whole run (TRL's default
# vllm_gpu_memory_utilization, which Keel leaves in place)
VLLM_COLOCATE_SHARE = 0.3


@dataclass(frozen=True)
class Cluster:
    gpu: str = "h100-80gb"
    nodes: int = 1
    gpus_per_node: int = 8

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_gib(self) -> float:
        if self.gpu == "cpu":  # processes on this machine share its memory
            import psutil

            return psutil.virtual_memory().total / GIB / self.gpus_per_node
        return GPUS[self.gpu]


@dataclass
class ModelShape:
    params: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    layer_params: int  # parameters of one decoder layer
    max_positions: int | None
    active: int = 0  # parameters a token passes through (a mixture of experts uses top-k of its experts)
    attention_width: int = 0  # heads x head_dim (what attention scores are computed over)
    kv_width: int = 0  # key/value heads x head_dim (what a KV cache holds per layer and token, keys and values each)
    heads: int = 0  # attention heads (query heads: eager attention makes one score matrix each)
    experts: int = 0  # experts per MoE layer (0: dense)
    experts_per_token: int = 0
    eager_attention: bool = False  # attention sinks: trained with eager attention (trainer/models/loading.py)
    mxfp4: bool = False  # an MXFP4 checkpoint, dequantized to bf16 at load (trainer/models/loading.py)

    def __post_init__(self):
        self.active = self.active or self.params
        self.attention_width = self.attention_width or self.hidden
        self.kv_width = self.kv_width or self.attention_width


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_no_ckpt: float
    activations_ckpt: float
    reference: float
    overhead: float
    generation: float = 0.0  # GRPO: memory its rollouts hold beyond the training step's own
    # gradients that are never live together with the activations (subtracted from the total)
    not_together: float = 0.0
    # CPU: freed blocks glibc malloc keeps resident in its heap (0 on GPUs)
    heap_kept: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.reference + self.overhead
                + self.heap_kept + self.generation - self.not_together)


def model_shape(config: dict, peft) -> ModelShape:
    """Parameter counts from the config's numbers (trainer/models/parameters.py): no torch, no
    weights."""
    counts = parameter_counts(config)
    text = text_config(config)
    params = counts.total
    trainable = params if peft.kind == "none" else counts.lora(peft.r, peft.target_modules)
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    intermediate = text.get("intermediate_size") or 4 * hidden
    experts, top_k = experts_and_top_k(config)
    if experts:
        # A token runs through top_k of the experts: that is what it computes and keeps for backward.
        intermediate = (text.get("moe_intermediate_size") or intermediate) * top_k
    head_dim = text.get("head_dim") or hidden // heads
    return ModelShape(params=params, trainable=trainable, layers=text["num_hidden_layers"], hidden=hidden,
                      intermediate=intermediate, vocab=text["vocab_size"], layer_params=counts.layer,
                      max_positions=text.get("max_position_embeddings"), active=active_parameters(config, counts),
                      attention_width=heads * head_dim, heads=heads, experts=experts,
                      kv_width=(text.get("num_key_value_heads") or heads) * head_dim,
                      experts_per_token=top_k, eager_attention=has_attention_sinks(config),
                      mxfp4=is_mxfp4(config))


def estimate(recipe, shape: ModelShape, cluster: Cluster) -> Estimate:
    t, d = recipe.training, recipe.distributed
    n = cluster.world
    cpu = cluster.gpu == "cpu"
    deepspeed = d.strategy.startswith("zero")
    frozen = shape.params - shape.trainable if recipe.peft.kind != "none" else 0
    notes = []
    # bytes per trainable parameter: weights, gradients, optimizer
    if cpu:
        # fp32 throughout (no autocast, DeepSpeed's bf16 off): weights, gradients, two AdamW
        # moments. DDP (gradient_as_bucket_view off, as accelerate leaves it) all-reduces through
        # buckets that hold a second copy of every gradient; DeepSpeed ZeRO keeps its own fp32
        # partition of the weights for the optimizer even when the model is fp32 already
        # (measured: benchmarks/results/plan_calibration.md).
        ddp_buckets = 4 if d.strategy == "ddp" and n > 1 else 0
        w_t, g_t, o_t = (4, 4 + ddp_buckets, 8 + (4 if deepspeed else 0))
        w_f = 4
    else:
        w_t, g_t, o_t = (2, 2, 12) if deepspeed else (4, 4, 8)
        w_f = 2 if deepspeed else 4
    if recipe.peft.kind == "qlora":
        w_f = NF4_BYTES
    elif recipe.peft.kind == "lora" and not cpu and shape.mxfp4:
        w_f = 2  # trainer/models/loading.py: a dequantized MXFP4 base stays bf16 under LoRA on bf16 runs
        notes.append("MXFP4 checkpoint: experts dequantized to bf16 at load; the frozen base is held in bf16")
    elif recipe.peft.kind == "lora" and not cpu:
        w_f = 2  # trainer/models/loading.py: a frozen LoRA base is held in the compute dtype
        notes.append("the frozen base is held in bf16 (the adapters in fp32, trained under bf16 autocast)")
    if shape.mxfp4 and (recipe.peft.kind != "lora" or cpu):
        notes.append("MXFP4 checkpoint: experts dequantized at load (bf16, then the run's dtype)")
    if shape.experts:
        notes.append(f"mixture of experts: {shape.experts} experts, {shape.experts_per_token} per token "
                     f"({shape.active / 1e9:.3g}B of {shape.params / 1e9:.3g}B parameters active); every expert's "
                     "weights are held")
    if shape.eager_attention:
        notes.append("attention sinks: eager attention (flash attention and SDPA would drop the sinks), whose "
                     f"score matrices (seq_len^2 x {shape.heads} heads per layer) are in the activations")
    weights = shape.trainable * w_t + frozen * w_f
    grads = shape.trainable * g_t
    opt = shape.trainable * o_t
    sharded = {"ddp": set(), "zero1": {"optimizer"}, "zero2": {"optimizer", "gradients"},
               "zero3": {"optimizer", "gradients", "weights"}, "fsdp2": {"optimizer", "gradients", "weights"}}[d.strategy]
    gathered_bytes = 4 if cpu else 2
    gathered = 0.0  # parameters DeepSpeed ZeRO-3 gathers whole for forward and backward
    if "optimizer" in sharded:
        opt /= n
    if "gradients" in sharded:
        grads /= n
    if "weights" in sharded:
        if deepspeed:
            # DeepSpeed keeps gathered parameters live up to stage3_max_live_parameters (1e9 by
            # default; Keel does not change it): a model under 1e9 parameters stays whole on
            # every rank between forward and backward.
            gathered = min(shape.params, ZERO3_MAX_LIVE_PARAMS) * gathered_bytes
            weights = weights / n + gathered
        else:
            weights = weights / n + 2 * shape.layer_params * gathered_bytes  # FSDP2: about two layers gathered
    if deepspeed and d.strategy != "zero1":
        # ZeRO-2/3 copy gradients into a reduce bucket of reduce_bucket_size elements (5e8 by
        # default) before reduce-scattering them: up to every trainable gradient once more.
        grads += min(shape.trainable, ZERO_REDUCE_BUCKET) * (4 if cpu else 2)
    if d.offload in ("optimizer", "optimizer_and_params"):
        opt = 0.0
        notes.append("optimizer states live in CPU memory (offload)")
    if d.offload == "optimizer_and_params":
        weights = 2 * shape.layer_params * gathered_bytes
        notes.append("parameters live in CPU memory (offload)")
    reference = 0.0
    # a frozen copy of the starting model: DPO's reference, GRPO's KL term (beta > 0); under LoRA
    # both use the base with the adapters switched off instead
    kl = recipe.technique == "grpo" and recipe.grpo.beta > 0
    if (recipe.technique == "dpo" or kl) and recipe.peft.kind == "none":
        reference = shape.params * w_f / (n if d.strategy in ("zero3", "fsdp2") else 1)
    no_ckpt, ckpt = activation_bytes(recipe, shape, cpu=cpu)
    act = ckpt if t.gradient_checkpointing else no_ckpt
    generation = 0.0
    if recipe.technique == "grpo":
        generation, note = generation_bytes(recipe, shape, cluster, activations=act)
        notes.append(note)
    # DDP's and FSDP2's .grad tensors are made during backward, as the activations are freed, and
    # freed by zero_grad after the optimizer step. With one micro-batch per step the two never
    # peak together: activations at the start of backward, gradients at its end. (With gradient
    # accumulation the gradients of earlier micro-batches are live through later forwards.
    # DeepSpeed keeps its gradient partitions and buckets for the whole run.)
    grad_values = shape.trainable * 4  # the full-size fp32 .grad tensors backward makes
    not_together = 0.0
    if d.strategy in ("ddp", "fsdp2") and t.grad_accum == 1:
        not_together = min(act, grad_values / (n if d.strategy == "fsdp2" else 1))
    subtotal = weights + grads + opt + act + reference - not_together
    heap_kept = 0.0
    if cpu:
        # freed by backward: activations and ZeRO-3's gathered parameters; reused: the full-size
        # gradients backward makes (every strategy makes them before reducing or bucketing them)
        heap_kept = max(0.0, CPU_HEAP_KEPT * (act + gathered) - grad_values)
        overhead = (CPU_DEEPSPEED_RUNTIME if deepspeed else 0) + OVERHEAD_FRACTION * subtotal
        notes.append("CPU: includes the freed heap glibc malloc keeps resident (fitted: "
                     "benchmarks/results/plan_calibration.md)")
    else:
        overhead = OVERHEAD_FIXED + OVERHEAD_FRACTION * subtotal
    return Estimate(weights=weights, gradients=grads, optimizer=opt, activations=act, activations_no_ckpt=no_ckpt,
                    activations_ckpt=ckpt, reference=reference, overhead=overhead, not_together=not_together,
                    heap_kept=heap_kept, generation=generation, notes=notes)


def generation_bytes(recipe, shape: ModelShape, cluster: Cluster, *, activations: float) -> tuple[float, str]:
    """What GRPO's rollouts hold beyond the training step, and how it was counted.

    With vLLM (TRL's colocate mode, GPUs) vLLM reserves its share of each GPU for the whole run.
    With transformers' generate, the KV cache of one generation batch (TRL generates micro-batch x
    grad_accum completions at once, each up to seq_len tokens with its prompt); it is freed before
    the training forward, so only what it needs beyond the activations raises the peak."""
    t = recipe.training
    if cluster.gpu != "cpu" and recipe.grpo.generation in ("vllm", "auto"):
        share = VLLM_COLOCATE_SHARE * cluster.memory_gib * GIB
        return share, (f"GRPO rollouts in TRL's colocated vLLM: {VLLM_COLOCATE_SHARE:.0%} of each GPU held for its "
                       "weights and KV cache (vllm_gpu_memory_utilization)"
                       + ("; grpo.generation auto assumes vLLM is in the training image" if
                          recipe.grpo.generation == "auto" else ""))
    value = 4 if cluster.gpu == "cpu" else 2
    seqs = t.micro_batch_size * t.grad_accum
    kv = seqs * t.seq_len * shape.layers * 2 * shape.kv_width * value
    return max(0.0, kv - activations), (f"GRPO rollouts with transformers: a KV cache of {seqs} sequences of up to "
                                        f"{t.seq_len} tokens ({kv / GIB:.2f} GiB), freed before the training step")


def activation_bytes(recipe, shape: ModelShape, *, cpu: bool) -> tuple[float, float]:
    """What backward keeps, without and with gradient checkpointing: per layer and token about
    8*hidden + 4*intermediate values (attention scores are not kept with SDPA/flash attention),
    in bf16 on GPUs and fp32 on CPU; plus the logits. On GPUs the logits are bf16 with an fp32
    copy and its gradient (2 + 4 + 4 bytes per vocabulary entry). On CPU everything is fp32 and
    the model's own cross-entropy keeps the log-softmax too: logits, log-probabilities and the
    gradient of each, 16 bytes per vocabulary entry at the peak of backward."""
    t = recipe.training
    value = 4 if cpu else 2
    seqs = t.micro_batch_size * (2 if recipe.technique == "dpo" else 1)
    tokens = seqs * t.seq_len
    per_layer = tokens * (8 * shape.hidden + 4 * shape.intermediate) * value
    logits = tokens * shape.vocab * (16 if cpu else 2 + 4 + 4)
    no_ckpt = shape.layers * per_layer + logits
    ckpt = shape.layers * tokens * shape.hidden * value + per_layer + logits
    if shape.eager_attention:
        scores = eager_scores_bytes(recipe, shape, cpu=cpu)
        # kept by every layer for backward, plus two more while a layer runs; with checkpointing
        # only the layer being recomputed holds them (and its backward the gradient of one)
        no_ckpt += (shape.layers + 2) * scores
        ckpt += 3 * scores
    return no_ckpt, ckpt


def eager_scores_bytes(recipe, shape: ModelShape, *, cpu: bool) -> float:
    """One layer's attention score matrix under eager attention: seq_len^2 per head and sequence."""
    t = recipe.training
    seqs = t.micro_batch_size * (2 if recipe.technique == "dpo" else 1)
    return seqs * shape.heads * t.seq_len ** 2 * (4 if cpu else 2)


# The model FLOPs utilisation the step time assumes, of the GPU's dense bf16 peak
# (trainer/models/flops.py). 40% is typical of well-tuned bf16 training at these sizes; it is an
# assumption, not a measurement (no GPU calibration here).
ASSUMED_MFU = 0.40
# Bytes/s one GPU moves in a collective: NVLink within a node, the network (EFA/InfiniBand,
# 400 Gb/s per GPU) across nodes.
INTRA_NODE_BW = 300e9
INTER_NODE_BW = 50e9


@dataclass
class StepTime:
    flops: float  # per device per optimizer step
    model_flops_per_token: int  # trainer/models/flops.py: what the tracker's MFU counts per token
    compute_s: float
    comm_s: float
    tokens: int  # per device per optimizer step

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s


def step_time(recipe, shape: ModelShape, cluster: Cluster) -> StepTime | None:
    """Seconds per optimizer step on one device: model FLOPs at ASSUMED_MFU of the GPU's peak, plus
    the collectives of the strategy, not overlapped (an upper bound). None on CPU."""
    if cluster.gpu not in PEAK_BF16_FLOPS:
        return None
    t, d, n = recipe.training, recipe.distributed, cluster.world
    dpo = recipe.technique == "dpo"
    tokens = t.micro_batch_size * t.grad_accum * t.seq_len * (2 if dpo else 1)  # DPO: chosen + rejected
    peft = recipe.peft.kind != "none"
    adapters = shape.trainable if peft else 0
    # the trained model's work per token, as MFU counts it (trainer/models/flops.py)
    model = training_flops_per_token(trained=adapters, frozen=shape.active) if peft else \
        training_flops_per_token(trained=shape.active)
    per_token = model
    if t.gradient_checkpointing:
        per_token += 2 * (shape.active + adapters)  # each layer's forward again during backward
    if dpo:
        per_token += 2 * shape.active  # the reference model's forward (with peft: adapters disabled)
    # causal attention scores and values (no parameters), in every pass: forward, backward (once under peft,
    # as the frozen layers' input gradients; twice otherwise), the recomputed and the reference forward
    attention = 2 * shape.layers * t.seq_len * shape.attention_width
    passes = 1.0 + (2.0 if not peft else 1.0) + (1.0 if t.gradient_checkpointing else 0.0) + (1.0 if dpo else 0.0)
    flops = (per_token + attention * passes) * tokens
    compute = flops / (PEAK_BF16_FLOPS[cluster.gpu] * ASSUMED_MFU)
    comm = 0.0
    if n > 1:
        bw = INTER_NODE_BW if cluster.nodes > 1 else INTRA_NODE_BW
        ring = 2 * (n - 1) / n  # a ring all-reduce moves this many bytes per byte reduced
        grad_bytes = shape.trainable * (2 if compute_dtype(cluster) == "bf16" else 4)
        comm = ring * grad_bytes / bw
        if d.strategy in ("zero3", "fsdp2"):
            # weights all-gathered for forward and again for backward, per micro-batch
            frozen_and_trained = shape.params * 2
            comm += 2 * t.grad_accum * (n - 1) / n * frozen_and_trained / bw
    return StepTime(flops=flops, model_flops_per_token=model, compute_s=compute, comm_s=comm, tokens=tokens)


def compute_dtype(cluster: Cluster) -> str:
    return "fp32" if cluster.gpu == "cpu" else "bf16"


def _apply(recipe, updates: dict[str, dict]):
    """A copy of the recipe with fields of its sections changed (no re-validation needed here)."""
    return recipe.model_copy(update={name: getattr(recipe, name).model_copy(update=fields)
                                     for name, fields in updates.items()})


def _describe(updates: dict[str, dict]) -> str:
    text = " ".join(f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
                    for section, fields in updates.items() for key, value in fields.items())
    return text + (" (same global batch)" if "grad_accum" in updates.get("training", {}) else "")


def candidate_changes(recipe) -> list[dict[str, dict]]:
    """Changes to try, smallest first, as {section: {field: value}}; later ones of the same
    fields supersede earlier ones when accumulated."""
    t, d = recipe.training, recipe.distributed
    out = []
    if not t.gradient_checkpointing:
        out.append({"training": {"gradient_checkpointing": True}})
    mbs, ga = t.micro_batch_size, t.grad_accum
    while mbs > 1:
        mbs, ga = mbs // 2, ga * 2
        out.append({"training": {"micro_batch_size": mbs, "grad_accum": ga}})
    ladder = ["zero2", "zero3"] if recipe.peft.kind != "qlora" else ["zero2"]
    current = ladder.index(d.strategy) if d.strategy in ladder else -1
    out += [{"distributed": {"strategy": strategy}} for strategy in ladder[current + 1:]]
    if recipe.peft.kind != "qlora":
        out.append({"distributed": {"strategy": "zero3", "offload": "optimizer"}})
    if recipe.peft.kind == "none":
        out.append({"peft": {"kind": "lora"}})
    return out


def smallest_change(recipe, cluster: Cluster, config: dict, shape: ModelShape, budget: float) -> str | None:
    """The first change that fits: one change alone (smallest first), then the same changes
    accumulated, then more nodes."""
    def fits(updates, cl) -> bool:
        changed = _apply(recipe, updates)
        s = shape if changed.peft == recipe.peft else model_shape(config, changed.peft)
        return estimate(changed, s, cl).total <= budget

    candidates = candidate_changes(recipe)
    for updates in candidates:
        if fits(updates, cluster):
            return _describe(updates)
    merged: dict[str, dict] = {}
    for updates in candidates:
        for section, fields in updates.items():
            merged.setdefault(section, {}).update(fields)
        if fits(merged, cluster):
            return _describe(merged)
    if recipe.peft.kind != "qlora":
        for factor in (2, 4, 8, 16, 32, 64):
            cl = replace(cluster, nodes=cluster.nodes * factor)
            if fits(merged, cl):
                return f"--nodes {cl.nodes} with " + _describe(merged)
    return None


@dataclass
class Plan:
    recipe: object
    cluster: Cluster
    shape: ModelShape
    estimate: Estimate
    global_batch: int
    steps: str
    fits: bool
    suggestion: str | None
    step: StepTime | None = None


def count_rows(path: str) -> int | None:
    p = Path(path).expanduser()
    if p.suffix == ".jsonl" and p.is_file():
        with open(p, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def plan(recipe, cluster: Cluster, config: dict) -> Plan:
    shape = model_shape(config, recipe.peft)
    t = recipe.training
    global_batch = t.micro_batch_size * t.grad_accum * cluster.world
    if t.max_steps:
        steps = str(t.max_steps)
    else:
        rows = count_rows(recipe.data.train)
        steps = (f"about {math.ceil(rows / global_batch) * t.epochs} ({t.epochs} epochs of {rows} rows; "
                 "examples are counted by keel prepare)" if rows else f"{t.epochs} epochs (rows counted by keel prepare)")
    est = estimate(recipe, shape, cluster)
    budget = cluster.memory_gib * GIB
    fits = est.total <= budget
    suggestion = None if fits else smallest_change(recipe, cluster, config, shape, budget)
    return Plan(recipe, cluster, shape, est, global_batch, steps, fits, suggestion,
                step_time(recipe, shape, cluster))


def _gib(x: float) -> str:
    return f"{x / GIB:8.1f} GiB"


def render(p: Plan) -> str:
    r, c, e, s = p.recipe, p.cluster, p.estimate, p.shape
    lines = [
        "resolved recipe:",
        *["  " + line for line in r.to_yaml().rstrip().splitlines()],
        "",
        f"model      {r.model.path}: {s.params / 1e9:.3g}B parameters, {s.layers} layers, hidden {s.hidden}, "
        f"vocab {s.vocab}",
        f"technique  {r.technique}, peft {r.peft.kind}"
        + (f" (r={r.peft.r}: {s.trainable / 1e6:.1f}M trainable, {s.trainable / s.params:.2%})" if r.peft.kind != "none"
           else " (all parameters trained)"),
        f"cluster    {c.nodes} node(s) x {c.gpus_per_node} {c.gpu} = world size {c.world}; "
        f"strategy {r.distributed.strategy}" + (f", offload {r.distributed.offload}" if r.distributed.offload != "none"
                                                 else ""),
        f"batch      micro {r.training.micro_batch_size} x grad_accum {r.training.grad_accum} x world {c.world} = "
        f"global {p.global_batch} sequences of up to {r.training.seq_len} tokens",
        f"steps      {p.steps}",
        "",
        f"memory per {'process' if c.gpu == 'cpu' else 'GPU'} (estimate)",
        f"  weights       {_gib(e.weights)}",
        f"  gradients     {_gib(e.gradients)}",
        f"  optimizer     {_gib(e.optimizer)}",
        f"  activations   {_gib(e.activations)}   (checkpointing off: {_gib(e.activations_no_ckpt).strip()}, "
        f"on: {_gib(e.activations_ckpt).strip()}; now {'on' if r.training.gradient_checkpointing else 'off'})",
    ]
    if e.reference:
        lines.append(f"  {'dpo' if r.technique == 'dpo' else 'kl'} reference {_gib(e.reference)}")
    if e.generation:
        lines.append(f"  generation    {_gib(e.generation)}   (GRPO rollouts)")
    if e.heap_kept:
        lines.append(f"  malloc heap   {_gib(e.heap_kept)}   (freed blocks kept resident)")
    if e.not_together:
        lines.append(f"  not together  {_gib(-e.not_together)}   (gradients made as backward frees the activations)")
    lines += [f"  overhead      {_gib(e.overhead)}", f"  total         {_gib(e.total)}   of {c.memory_gib:.1f} GiB",
              *[f"  note: {n}" for n in e.notes], ""]
    if p.step is not None:
        st = p.step
        lines += [f"step time  about {st.seconds:.1f} s per optimizer step ({st.compute_s:.1f} s compute at an assumed "
                  f"{ASSUMED_MFU:.0%} MFU + {st.comm_s:.1f} s collectives, not overlapped); "
                  f"{st.tokens * c.world / st.seconds:,.0f} tokens/s for the cluster", ""]
    if p.fits:
        lines.append(f"verdict    fits ({e.total / GIB / c.memory_gib:.0%} of {c.gpu} memory)")
    else:
        lines.append(f"verdict    does NOT fit ({e.total / GIB:.1f} GiB > {c.memory_gib:.1f} GiB)")
        lines.append(f"smallest change that fits: {p.suggestion}" if p.suggestion else
                     "no single change found that fits; use a larger GPU or QLoRA")
    return "\n".join(lines)
