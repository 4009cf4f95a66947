"""The config schema: one dataclass per section. Torch-free; ``zoo.config`` parses YAML and overrides onto it.

The same dataclasses are the Python API (``ModelConfig(dim=64)``) and what a checkpoint's ``config.json`` stores.
Each field's ``metadata`` carries its help text and, for enumerations, its ``choices``; ``zoo train --help`` is
generated from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from zoo.data.tasks import InductionConfig, MQARConfig, NIAHConfig, SelectiveCopyConfig
from zoo.registry import ARCHITECTURES


def _choices(*values: str, help: str) -> Any:
    return {"choices": values, "help": help}


# ----------------------------------------------------------------------------------------------------- sections
@dataclass
class AttentionConfig:
    """Options of the ``attention`` mixer (``zoo.layers.Attention``)."""

    heads: int = field(default=4, metadata={"help": "query heads (zoo default)"})
    kv_heads: Optional[int] = field(default=None, metadata={"help": "key/value heads (grouped-query); null = heads"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head width; null = dim // heads"})
    window: Optional[int] = field(default=None, metadata={"help": "sliding-window length; null = full causal"})
    persistent_tokens: int = field(default=0, metadata={"help": "learned prefix tokens visible to every query"})
    causal: bool = field(default=True, metadata={"help": "false = bidirectional (encoders)"})
    rope: bool = field(default=True, metadata={"help": "rotary position embeddings on queries and keys"})
    conv_size: int = field(default=0, metadata={"help": "residual short causal conv on the input (0 = none)"})
    rope_base: float = field(default=10000.0, metadata={"help": "rotary base frequency (RoFormer default)"})


@dataclass
class TitansMemoryConfig:
    """Options of the ``titans`` mixer (``TitansMemory``, the LMM alone) and the ``memory`` of the Titans hybrids."""

    heads: int = field(default=4, metadata={"help": "memory heads H (zoo default)"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head width d; null = dim // heads"})
    memory_depth: int = field(default=2, metadata={
        "help": "layers L_M of the memory MLP, 1 = matrix memory (paper default, NeurIPS App. E.1)"})
    memory_expansion: int = field(default=4, metadata={
        "help": "hidden width of the memory MLP / d (paper default, NeurIPS App. E.1)"})
    chunk_size: int = field(default=16, metadata={
        "help": "tokens b whose gradients share the chunk-start weights (paper default, NeurIPS App. E.1)"})
    conv_size: int = field(default=4, metadata={"help": "short causal conv on q, k, v (paper default, v1 sec. 4.4)"})
    momentum: bool = field(default=True, metadata={"help": "false = the paper's 'w/o momentum' ablation"})
    forget: bool = field(default=True, metadata={"help": "false = the paper's 'w/o weight decay' ablation"})
    theta_max: float = field(default=1.0, metadata={"help": "upper bound of the inner learning rate (zoo default)"})
    backend: str = field(default="auto", metadata=_choices(
        "auto", "reference", "torch", "triton",
        help="memory op: auto = Triton for CUDA tensors where the op has it (memory_depth 1), else torch"))
    checkpoint_chunks: int = field(default=0, metadata={
        "help": "G > 0: activation checkpointing of the memory in groups of G chunks (same results, less memory)"})


@dataclass
class TitansMACConfig:
    """Options of ``titans_mac`` (``TitansMAC``, memory as context)."""

    heads: int = field(default=4, metadata={"help": "attention heads (the memory's are memory.heads)"})
    segment_len: int = field(default=128, metadata={
        "help": "segment length C, a multiple of memory.chunk_size (zoo default: CPU-sized; the paper's is 512)"})
    persistent_tokens: int = field(default=16, metadata={
        "help": "learned persistent-memory tokens N_p (zoo default: CPU-sized; the paper's is 128)"})
    memory: TitansMemoryConfig = field(default_factory=TitansMemoryConfig)
    store: str = field(default="residual", metadata=_choices(
        "residual", "attention_norm", "attention",
        help="what the memory stores: RMSNorm(x + y), RMSNorm(y) or the raw attention output y (the original module)"))
    memory_token_norm: bool = field(default=True, metadata={
        "help": "RMSNorm on the memory tokens h before attention (false: unnormalised, the original module)"})
    out_proj: bool = field(default=True, metadata={
        "help": "linear layer after the gate, small init (paper v1 sec. 4.2; false: none, the original module)"})
    conv_size: int = field(default=4, metadata={
        "help": "residual causal token-shift conv on the input, taps (0 = none, the original module)"})


@dataclass
class TitansWindowConfig:
    """Options of the sliding-window hybrids: ``titans_mal`` (memory as a layer) and the base of ``titans_mag``'s."""

    heads: int = field(default=4, metadata={"help": "attention heads (the memory's are memory.heads)"})
    window: int = field(default=128, metadata={
        "help": "sliding-window length (zoo default: CPU-sized; the paper's is 2048)"})
    persistent_tokens: int = field(default=16, metadata={
        "help": "learned persistent-memory tokens N_p (zoo default: CPU-sized; the paper's is 128)"})
    memory: TitansMemoryConfig = field(default_factory=TitansMemoryConfig)
    conv_size: int = field(default=4, metadata={
        "help": "residual causal token-shift conv on the attention input, taps (0 = none, the original module)"})
    memory_persistent: bool = field(default=True, metadata={
        "help": "the memory absorbs the persistent tokens first (paper v1 eqs. 26, 29; false: the original module)"})


@dataclass
class TitansMAGConfig(TitansWindowConfig):
    """Options of ``titans_mag`` (``TitansMAG``, memory as a gate): the sliding-window options and the gate's."""

    out_proj: bool = field(default=True, metadata={
        "help": "linear layer after the gate, small init (paper v1 sec. 4.2; false: none, the original module)"})


@dataclass
class GDNConfig:
    """Options of ``gdn`` (``GatedDeltaNet``, the one-memory baseline of MoM)."""

    heads: int = field(default=2, metadata={"help": "heads H (zoo default)"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head key/value width d; null = dim // heads"})
    expand_v: float = field(default=1.0, metadata={"help": "value head width / d (fla's expand_v; zoo default 1)"})
    value_heads: Optional[int] = field(default=None, metadata={
        "help": "value heads H_v, a multiple of heads (fla's num_v_heads); null = heads"})
    use_gate: bool = field(default=True, metadata={"help": "the SiLU output gate W_G (fla's use_gate)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the per-head output RMSNorm"})


@dataclass
class MoMConfig:
    """Options of ``mom`` (``MixtureOfMemories``)."""

    heads: int = field(default=2, metadata={"help": "heads H (zoo default)"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head key/value width d; null = dim // heads"})
    num_memories: int = field(default=4, metadata={"help": "routed memories M (paper default)"})
    topk: int = field(default=2, metadata={"help": "memories each token is routed to (paper default)"})
    shared_memory: bool = field(default=True, metadata={"help": "add the always-on shared memory (paper default)"})
    aux_loss_scale: float = field(default=0.01, metadata={
        "help": "weight of the load-balancing loss (the official code's default)"})
    aux_loss_form: str = field(default="global", metadata=_choices(
        "global", "layer_mean", help="one loss over all layers' routing (official code) or the mean of per-layer "
                                     "losses (zoo before, at scale 1e-3)"))
    use_gate: bool = field(default=True, metadata={"help": "the SiLU output gate W_G (fla's use_output_gate)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the per-head output RMSNorm"})


@dataclass
class MambaConfig:
    """Options of ``mamba`` (Mamba-1, S6) and ``bimamba`` (Vim's bidirectional block)."""

    d_state: int = field(default=16, metadata={"help": "SSM state size N (paper default)"})
    d_conv: int = field(default=4, metadata={"help": "depthwise causal conv width (paper default)"})
    expand: int = field(default=2, metadata={"help": "inner width E / dim (paper default)"})
    dt_rank: Optional[int] = field(default=None, metadata={
        "help": "rank R of the delta projection; null = ceil(dim/16) (paper default)"})


@dataclass
class Mamba2Config:
    """Options of ``mamba2`` (state-space duality)."""

    d_state: int = field(default=64, metadata={"help": "SSM state size N (zoo default: CPU-sized; the paper's is 128)"})
    headdim: int = field(default=32, metadata={"help": "head width P (zoo default: CPU-sized; the paper's is 64)"})
    ngroups: int = field(default=1, metadata={"help": "groups G sharing B and C (paper default)"})
    chunk_size: int = field(default=64, metadata={"help": "SSD chunk length (zoo default: fastest on CPU)"})
    expand: int = field(default=2, metadata={"help": "inner width E / dim (paper default)"})
    d_conv: int = field(default=4, metadata={"help": "depthwise causal conv width (paper default)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the gated output RMSNorm"})


@dataclass
class MemoryFormerConfig:
    """Options of the ``memoryformer`` block (``MemoryAttention`` mixer + ``MemoryFFN``, hash-lookup layers)."""

    heads: int = field(default=4, metadata={"help": "attention heads"})
    tau: int = field(default=8, metadata={"help": "bits per hash chunk: each table has 2^tau rows (paper default)"})
    score: str = field(default="l1prob", metadata=_choices(
        "prob", "l1prob", help="bucket weight: the released code's L1 form ||z||_1 * p (default), or the paper's p"))
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature t of p(z) = exp(<sign z, z>/t) / sum_h exp(<h, z>/t) (paper; 1 = plain softmax)"})
    table_weight_decay: float = field(default=0.1, metadata={
        "help": "weight decay of the hash tables (released recipe default; 0 = never decayed)"})
    rotary_pct: float = field(default=0.25, metadata={
        "help": "fraction of each head's channels rotated by RoPE (released code default)"})


@dataclass
class VisionConfig:
    """Options of ``model.architecture=vision`` (``VisionClassifier``: patch embedding, middle class token)."""

    image_size: int = field(default=8, metadata={"help": "square input images of this many pixels per side"})
    channels: int = field(default=1, metadata={"help": "input channels"})
    patch_size: int = field(default=2, metadata={"help": "square patch side"})
    patch_stride: Optional[int] = field(default=None, metadata={
        "help": "pixels between patches (Vim's stride-8 models overlap 16-pixel patches); null = patch_size"})
    num_classes: int = field(default=10, metadata={"help": "output classes"})


@dataclass
class HMTConfig:
    """Options of ``model.architecture=hmt``: ``zoo.models.HMT`` (hierarchical memory) over the block-pattern LM."""

    segment_len: int = field(default=64, metadata={"help": "text tokens L per segment"})
    sensory_len: int = field(default=8, metadata={"help": "sensory tokens k: the previous segment's tail (0 = off)"})
    cache_size: int = field(default=32, metadata={"help": "memory embeddings N kept in the FIFO cache"})
    summary_fraction: float = field(default=0.5, metadata={"help": "summary tokens j = floor(fraction * L)"})
    recall_dim: Optional[int] = field(default=None, metadata={"help": "recall width d_h; null = dim"})
    summary_source: str = field(default="current", metadata=_choices(
        "previous", "current", help="recall query from the current segment's start (paper default) or the previous "
                                    "segment's end (strictly causal)"))
    recall: bool = field(default=True, metadata={"help": "false = stage 1 (P_n = M_{n-1}, no cache recall)"})
    checkpoint_segments: bool = field(default=False, metadata={"help": "activation checkpointing of each main pass"})
    freeze_backbone: bool = field(default=False, metadata={"help": "train only m0, T, Wq and Wk"})
    loss_last_segments: Optional[int] = field(default=1, metadata={
        "help": "score only the last s segments of each window (1 = the reference's loss); null = every segment"})


@dataclass
class EmbeddingConfig:
    """Options of ``model.architecture=embedding``: ``zoo.models.EmbeddingModel`` (backbone + pooling head)."""

    bidirectional: bool = field(default=True, metadata={"help": "build mixers that support it non-causal"})
    pooling: str = field(default="latent", metadata=_choices(
        "latent", "mean", "last", help="NV-Embed latent attention, masked mean, or the last valid token"))
    num_latents: int = field(default=128, metadata={
        "help": "latent dictionary size r (zoo default: CPU-sized; NV-Embed's is 512)"})
    heads: int = field(default=4, metadata={"help": "latent-attention heads (zoo default: CPU-sized; NV-Embed's is 8)"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head width; null = dim // heads"})
    latent_dim: Optional[int] = field(default=None, metadata={"help": "latent width; null = dim"})
    mlp_ratio: int = field(default=4, metadata={"help": "GEGLU feed-forward multiplier of the head (NV-Embed default)"})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise the embeddings"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature tau"})
    in_batch_negatives: bool = field(default=True, metadata={"help": "other rows' positives are negatives"})


@dataclass
class ModelConfig:
    """The network: a stack of pre-norm blocks built from ``pattern``, repeated to ``depth`` blocks."""

    architecture: str = field(default="lm", metadata=_choices(
        *ARCHITECTURES, help="; ".join(f"{name} = {entry.help}" for name, entry in ARCHITECTURES.items())))
    vocab_size: int = field(default=258, metadata={"help": "token vocabulary (at least the data's)"})
    dim: int = field(default=128, metadata={"help": "model width D"})
    depth: int = field(default=2, metadata={"help": "number of blocks"})
    pattern: list = field(default_factory=lambda: ["attention"],
                          metadata={"help": "mixer names repeated to depth; 'mlp' is an MLP-only block"})
    mlp: str = field(default="swiglu", metadata=_choices("swiglu", "none", help="channel mixer of each block"))
    mlp_expansion: float = field(default=8 / 3, metadata={"help": "SwiGLU hidden width / dim"})
    mlp_hidden: Optional[int] = field(default=None, metadata={
        "help": "exact SwiGLU hidden width (imported checkpoints); null = mlp_expansion * dim rounded up to 16"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the input embedding with the LM head"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the embeddings and each residual branch"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    init_std: float = field(default=0.02, metadata={"help": "std of embedding and linear initialisation"})
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    titans: TitansMemoryConfig = field(default_factory=TitansMemoryConfig)
    titans_mac: TitansMACConfig = field(default_factory=TitansMACConfig)
    titans_mag: TitansMAGConfig = field(default_factory=TitansMAGConfig)
    titans_mal: TitansWindowConfig = field(default_factory=TitansWindowConfig)
    gdn: GDNConfig = field(default_factory=GDNConfig)
    mom: MoMConfig = field(default_factory=MoMConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    memoryformer: MemoryFormerConfig = field(default_factory=MemoryFormerConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    hmt: HMTConfig = field(default_factory=HMTConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)


@dataclass
class RetrievalDataConfig:
    """Contrastive pairs for ``data.name=ict`` (inverse cloze over the KJV) and ``data.name=needle`` (synthetic)."""

    window: int = field(default=5, metadata={"help": "verses per ict window (query verse + positive passage)"})
    hard_negatives: int = field(default=1, metadata={"help": "hard negatives h per query"})
    query_len: int = field(default=128, metadata={"help": "max query tokens"})
    passage_len: int = field(default=512, metadata={"help": "max passage tokens"})
    instruction: str = field(default="", metadata={"help": "query task text: 'Instruct: {task}\\nQuery: ' prefix"})
    needle_len: int = field(default=8, metadata={"help": "needle tokens (needle task)"})
    train_examples: int = field(default=20000, metadata={"help": "needle training examples"})
    test_examples: int = field(default=500, metadata={"help": "needle held-out examples"})


@dataclass
class DataConfig:
    """What the model reads: bundled KJV text, local text files, or a synthetic memory task."""

    name: str = field(default="kjv", metadata=_choices(
        "kjv", "text", "mqar", "selective_copy", "induction", "niah", "digits", "ict", "needle",
        help="kjv = bundled King James text; text = local files in data.path; digits = scikit-learn's 8x8 "
             "digits (vision); ict / needle = retrieval pairs (embedding); others are synthetic tasks"))
    path: Optional[str] = field(default=None, metadata={"help": "local .txt/.jsonl/.parquet file (data.name=text)"})
    text_field: str = field(default="text", metadata={"help": "column holding text in .jsonl/.parquet files"})
    tokenizer: str = field(default="bytes", metadata={"help": "'bytes' or a path to a tokenizer.json"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training window (text data)"})
    pack: bool = field(default=False, metadata={
        "help": "text data: pack whole documents into the training windows with their boundaries (no state or "
                "loss crosses one; docs/training.md#packed-documents)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per device per step"})
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per evaluation batch"})
    seed: int = field(default=0, metadata={"help": "seed of the data (shuffling, synthetic examples)"})
    split: str = field(default="book", metadata=_choices(
        "book", "fraction", help="held-out text: the last 10% of books, or a random fraction of chapters"))
    val_fraction: float = field(default=0.01, metadata={"help": "held-out chapters when split=fraction"})
    mqar: MQARConfig = field(default_factory=MQARConfig)
    selective_copy: SelectiveCopyConfig = field(default_factory=SelectiveCopyConfig)
    induction: InductionConfig = field(default_factory=InductionConfig)
    niah: NIAHConfig = field(default_factory=NIAHConfig)
    retrieval: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay; no weight decay on norms, biases and embeddings."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices"})
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr of the cosine"})
    decay_steps: Optional[int] = field(default=None, metadata={
        "help": "step where the cosine ends; null = trainer.max_steps (fix it to stop early and resume on schedule)"})


@dataclass
class TrainerConfig:
    """Lightning Trainer settings, mapped field by field."""

    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    accelerator: str = field(default="auto", metadata=_choices("auto", "cpu", "gpu", help="device kind"))
    devices: int = field(default=1, metadata={"help": "devices (processes) per node"})
    num_nodes: int = 1
    strategy: str = field(default="auto", metadata=_choices(
        "auto", "ddp", "fsdp", help="ddp replicates, fsdp shards every block (FSDP2); both run on CPU (gloo) and GPU"))
    precision: str = field(default="32-true", metadata=_choices(
        "32-true", "bf16-mixed", "16-mixed", "bf16-true", help="numeric precision"))
    gradient_clip_val: float = field(default=1.0, metadata={"help": "clip the gradient norm; 0 disables"})
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = field(default=10, metadata={"help": "progress line and metrics interval"})
    val_check_interval: int = field(default=200, metadata={"help": "validate every N optimizer steps"})
    limit_val_batches: int = field(default=20, metadata={"help": "held-out batches per validation"})
    checkpoint_every_n_steps: int = field(default=100, metadata={"help": "write last.ckpt every N steps"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block in backward: less activation memory for about one more forward"})
    stop_at_accuracy: Optional[float] = field(default=None, metadata={
        "help": "stop once val/accuracy reaches this (synthetic tasks; Zoology stops at 0.99)"})


@dataclass
class RunConfig:
    """Where a run writes: ``<root>/<name>/``."""

    name: Optional[str] = field(default=None, metadata={"help": "run directory name; null = the config file's stem"})
    root: str = field(default="runs", metadata={"help": "parent directory of runs"})


@dataclass
class EvalConfig:
    """``zoo eval`` and end-of-training evaluation."""

    max_batches: Optional[int] = field(default=None, metadata={"help": "cap on held-out batches; null = all"})
    out: Optional[str] = field(default=None, metadata={"help": "zoo eval: also write the JSON here; null = stdout only"})


@dataclass
class Config:
    """A whole run. The same dataclasses are the Python API and what ``config.json`` stores."""

    seed: int = field(default=0, metadata={"help": "training seed (init, dropout); data.seed is separate"})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "export directory whose weights initialise the model (HMT stage 2, an embedder from an LM)"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
