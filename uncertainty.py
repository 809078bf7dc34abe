"""
Per-prompt uncertainty signals for GCPO: entropy baselines, geometry-aware
dispersion of a group's responses, and reward calibration.

Every function is pure (tensors and numbers in, tensors out) and works on one
group or on a leading batch of groups. Formula labels (2.x, 3.x) follow the
method description: section 2 is the uncertainty signals, section 3 the reward
calibration. The README has a table that maps each label to its function.

    from uncertainty import embedding_kernel, calibrated_uncertainty
    K = embedding_kernel(emb, tau=0.5)            # (B, G, G) from (B, G, D) embeddings
    u = calibrated_uncertainty(K, rewards)        # (B,) in [0, 1], feed to gcpo.uncertainty_weight

Shape legend: B prompts, G responses per prompt, T response tokens, V vocabulary,
D embedding size. A leading "..." means "any batch dimensions".

Departures from the GCPO paper (Zhang et al., 2026, known here only from its
abstract) and simplifications. These are this project's formulation, each
switchable by argument:
1. The geometric signal is the von Neumann entropy of an RBF kernel on the unit
   sphere, K_ij = exp((cos_ij - 1) / tau), i.e. Kernel Language Entropy on sentence
   embeddings. The kernel and its bandwidth tau are this project's choice.
2. Calibration uses kappa, the share of the kernel dispersion that the centred
   rewards explain (3.1). It treats kernel features as a stand-in for score
   directions, which is an assumption, not a derivation.
3. All normalised signals divide by log G, so they lie in [0, 1] for any G >= 2.
   Token entropy is divided by log V and predictive entropy is mapped through
   1 - exp(-nll); both maps are this project's choice.
4. Likelihood-weighted semantic entropy uses whatever sequence log-probability the
   caller passes (summed or length-normalised); train.py passes the sum.
"""
import math
import warnings

import torch

from gcpo import masked_mean


# ----------------------------------------------------------------------------
# Entropy baselines (token, predictive, semantic)

def token_entropy(logits, temperature=1.0):
    """Entropy in nats of softmax(logits / temperature) at each position: (..., V) -> (...)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define a sampling distribution, got {temperature}")
    # bf16 / fp16 logits lose too much precision in log_softmax; work in float32 or wider
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    # (2.1) H_t = -sum_v p_v log p_v with p = softmax(z / temperature)
    logp = torch.log_softmax(x / temperature, dim=-1)                     # (..., V)
    # a -inf logit has p = 0; 0 * (-inf) would be NaN, and its true contribution is 0
    plogp = torch.exp(logp) * logp.nan_to_num(neginf=0.0)                 # (..., V)
    return -plogp.sum(dim=-1)                                             # (...)


def mean_token_entropy(entropy, mask):
    """Mean per-token entropy over each response's real tokens: (..., T) -> (...); 0 for an empty mask."""
    return masked_mean(entropy, mask, dim=-1)


def predictive_entropy(logp, mask):
    """Length-normalised negative log-likelihood of each response: (..., T) -> (...)."""
    # (2.2) PE_i = -(1 / |o_i|) sum_t log pi(o_i,t | q, o_i,<t)
    return -masked_mean(logp, mask, dim=-1)


def semantic_entropy(cluster_ids, seq_logp=None):
    """
    Semantic entropy in nats over meaning clusters: (..., G) -> (...).

    cluster_ids: integer cluster label of each response (any integers; equal label
    means equal meaning). For math, tasks.cluster_by_answer groups responses whose
    final answers are equivalent, and puts each response with no parsable answer
    in a cluster of its own (one shared cluster is an option there).
    seq_logp: None for the discrete estimator, else each response's sequence
    log-probability for the likelihood-weighted one.
    """
    same = cluster_ids.unsqueeze(-1) == cluster_ids.unsqueeze(-2)          # (..., G, G)
    G = cluster_ids.shape[-1]
    if seq_logp is None:
        # (2.3) discrete: p_k = |C_k| / G; every response carries weight 1 / G
        log_w = torch.full(cluster_ids.shape, -math.log(G), dtype=torch.float32,
                           device=cluster_ids.device)                     # (..., G)
    else:
        # (2.4) likelihood-weighted: p_k = sum_{i in C_k} p(o_i) / sum_i p(o_i), in log space
        log_w = torch.log_softmax(seq_logp, dim=-1)                       # (..., G)
    # mass of response i's cluster: log m_i = logsumexp_{j ~ i} log w_j
    log_mass = torch.where(same, log_w.unsqueeze(-2), -math.inf).logsumexp(dim=-1)  # (..., G)
    # H = -sum_k p_k log p_k = -sum_i w_i log m_i, since the w_i of cluster k sum to p_k
    w = log_w.exp()                                                       # (..., G)
    terms = torch.where(w > 0, w * log_mass, torch.zeros_like(w))         # (..., G)
    return -terms.sum(dim=-1)                                             # (...)


def cluster_by_similarity(emb, threshold=0.9):
    """
    Meaning clusters for free text: (G, D) -> (G,) integer labels. Response i joins
    the cluster of the first earlier response whose cosine similarity is >= threshold,
    else it starts a new cluster. Greedy and order-dependent, like most such rules.
    """
    cos = _cosine(emb)                                                    # (G, G)
    labels = list(range(emb.shape[0]))
    for i in range(emb.shape[0]):
        for j in range(i):
            if cos[i, j] >= threshold:
                labels[i] = labels[j]
                break
    return torch.tensor(labels, device=emb.device)                        # (G,)


def cluster_kernel(cluster_ids):
    """Cluster-indicator kernel K_ij = 1 if i and j share a meaning else 0: (..., G) -> (..., G, G)."""
    return (cluster_ids.unsqueeze(-1) == cluster_ids.unsqueeze(-2)).float()


# ----------------------------------------------------------------------------
# Geometry-aware dispersion (closes the anisotropic gap)

def _cosine(emb):
    """Cosine similarity matrix of (..., G, D) embeddings, with a clear error for zero vectors."""
    if not torch.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf; check the encoder output")
    norm = emb.norm(dim=-1, keepdim=True)                                 # (..., G, 1)
    if (norm == 0).any():
        raise ValueError(
            "an embedding is all zeros, so its cosine similarity is undefined; "
            "check the encoder (an empty response should still embed to a non-zero vector)")
    unit = emb / norm                                                     # (..., G, D)
    return (unit @ unit.transpose(-1, -2)).clamp(-1.0, 1.0)               # (..., G, G)


def center_embeddings(emb, mean):
    """
    (2.8) Subtract a running mean embedding (D,) before the kernel normalises.
    Sentence-embedding spaces are anisotropic: unrelated texts still have a positive
    cosine, which compresses the kernel's range. Centring spreads it back out.
    """
    return emb - mean                                                     # (..., G, D)


def embedding_kernel(emb, tau=0.5, kind="rbf"):
    """
    Kernel between a group's responses from their embeddings: (..., G, D) -> (..., G, G).
    emb need not be unit-norm. kind "rbf" (default) is PSD with unit diagonal and
    entries in (0, 1]; kind "cosine" returns the plain cosine Gram matrix.
    """
    cos = _cosine(emb)                                                    # (..., G, G)
    if kind == "cosine":
        warnings.warn("the cosine Gram kernel ignores the sign of a cosine: von Neumann "
                      "entropy scores two opposite responses like two identical ones; "
                      "prefer kind='rbf'", stacklevel=2)
        return cos
    if kind != "rbf":
        raise ValueError(f"unknown kernel kind {kind!r}; use 'rbf' or 'cosine'")
    if tau <= 0:
        raise ValueError(f"kernel bandwidth tau must be > 0, got {tau}")
    # (2.5) K_ij = exp((cos_ij - 1) / tau): an RBF kernel on the unit sphere,
    # since |e_i - e_j|^2 = 2 - 2 cos_ij
    return torch.exp((cos - 1.0) / tau)                                   # (..., G, G)


def von_neumann_entropy(K):
    """Von Neumann entropy in nats of rho = K / trace(K): (..., G, G) -> (...); 0 for G = 1."""
    trace = K.diagonal(dim1=-2, dim2=-1).sum(-1)                          # (...)
    if (trace <= 0).any():
        raise ValueError("kernel has a non-positive trace; a kernel needs a positive diagonal")
    # float64 eigenvalues: the small ones decide the entropy of near-identical groups
    rho = (K.double() / trace.double()[..., None, None]).detach()         # (..., G, G)
    # (2.6) H_geo = -sum_j lambda_j log lambda_j over the eigenvalues of rho
    lam = torch.linalg.eigvalsh(rho).clamp_min(0.0)                       # (..., G)
    terms = torch.where(lam > 0, lam * lam.log(), torch.zeros_like(lam))  # (..., G)
    return (-terms.sum(-1)).clamp_min(0.0).to(K.dtype)                    # (...)


def kernel_dispersion(K):
    """(2.7) Total kernel dispersion T = 1 - mean(K): (..., G, G) -> (...)."""
    return 1.0 - K.mean(dim=(-2, -1))


# ----------------------------------------------------------------------------
# Reward calibration (closes the calibration gap)

def reward_explained_share(K, rewards, tol=1e-6):
    """
    kappa in [0, 1]: the share of the kernel dispersion that the rewards explain.
    K (..., G, G), rewards (..., G) -> (...). Defined as 0 when the rewards do not
    vary or the responses do not vary (T <= tol).
    """
    A = rewards - rewards.mean(dim=-1, keepdim=True)                      # (..., G)
    A = A.to(K.dtype)
    G = K.shape[-1]
    T = kernel_dispersion(K)                                              # (...)
    # (3.1) kappa = (A^T K A) / (G * (A^T A) * T); <= 1 by Cauchy-Schwarz, because
    # sum_i A_i = 0 lets A^T K A = |sum_i A_i (phi_i - phi_mean)|^2 and sum_i |phi_i - phi_mean|^2 = G T
    AKA = torch.einsum("...i,...ij,...j->...", A, K, A)                   # (...)
    AA = (A * A).sum(dim=-1)                                              # (...)
    defined = (AA > 0) & (T > tol)
    denom = torch.where(defined, G * AA * T, torch.ones_like(T))
    kappa = torch.where(defined, AKA / denom, torch.zeros_like(T))
    # the clamp only absorbs rounding, because the bound above is exact in real arithmetic
    return kappa.clamp(0.0, 1.0)                                          # (...)


def calibrate(u, kappa):
    """(3.2) Calibrated uncertainty U = u * (1 - kappa): the part the rewards do not explain."""
    return u * (1.0 - kappa)


# ----------------------------------------------------------------------------
# Per-prompt uncertainty in [0, 1], the input of gcpo.uncertainty_weight

def semantic_uncertainty(cluster_ids, seq_logp=None):
    """Semantic entropy divided by log G (the SEED-GRPO signal): (..., G) -> (...) in [0, 1]."""
    G = cluster_ids.shape[-1]
    if G < 2:
        return torch.zeros(cluster_ids.shape[:-1], device=cluster_ids.device)
    return (semantic_entropy(cluster_ids, seq_logp) / math.log(G)).clamp(0.0, 1.0)


def geometric_uncertainty(K):
    """Von Neumann entropy of the kernel divided by log G: (..., G, G) -> (...) in [0, 1]."""
    G = K.shape[-1]
    if G < 2:
        return torch.zeros(K.shape[:-2], dtype=K.dtype, device=K.device)
    return (von_neumann_entropy(K) / math.log(G)).clamp(0.0, 1.0)


def calibrated_uncertainty(K, rewards):
    """GCPO's signal U = H_geo / log G * (1 - kappa): (..., G, G), (..., G) -> (...) in [0, 1]."""
    return calibrate(geometric_uncertainty(K), reward_explained_share(K, rewards))


def token_uncertainty(entropy, mask, vocab_size):
    """Group mean of mean token entropy divided by log V: (..., G, T) -> (...) in [0, 1]."""
    per_response = mean_token_entropy(entropy, mask)                      # (..., G)
    return (per_response.mean(dim=-1) / math.log(vocab_size)).clamp(0.0, 1.0)


def predictive_uncertainty(logp, mask):
    """1 - exp(-mean predictive entropy): 1 minus the group's geometric-mean token probability."""
    nll = predictive_entropy(logp, mask).mean(dim=-1)                     # (...)
    return 1.0 - torch.exp(-nll.clamp_min(0.0))
