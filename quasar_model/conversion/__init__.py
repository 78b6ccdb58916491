"""A Quasar-Long student that starts as its teacher: the weight map from teacher families.

Stage 1 of the Quasar-10B recipe (the training, hidden-state MSE against the live teacher, is
distill/structural.py's): start the student as the teacher, with attention layers swapped for
recurrent branches. Two kinds of swap:

- replacement mode "replace": the hybrid layer is the branch alone; the teacher's attention
  projections become the branch's, and the layer-wise MSE teaches the branch to produce what
  the attention did (the recipe proper: the swapped layers keep no KV cache);
- mode "add" (the spec's): GQA + sigmoid(a) * Branch; the attention stays, the branch starts off.
  Trained against a teacher whose function the trunk already computes, the branch's best move is
  to stay silent, so "add" students are structural copies to distill further, not a swap.

    teacher (qwen3 / llama / mistral decoder)       student (QuasarLongForCausalLM)
    embed_tokens, norm, lm_head (tied or not)   ->  the same
    layer i  input_layernorm                    ->  input_norm
             post_attention_layernorm           ->  post_norm
             self_attn q, k, v, o (+ q/k norm)  ->  GQA: qkv_proj = [q; k; v], o_proj, q/k norm
                                                    (mixer, or mixer.attn on a hybrid layer)
             mlp gate, up, down                 ->  dense SwiGLU; on MoE layers the shared expert,
                                                    with every routed expert's down_proj zero
    hybrid layer branch (quasar | raven | gla)  ->  q/k/v/o copied from the same attention

In "add" mode with the branch switched off (hybrid_alpha_init = -15, the spec's value) and no
routed expert contributing, the student computes the teacher's function (`logit_gap` measures
it). The branch copies of q/k/v/o start the recurrent read-out where the attention's is, the
usual linearisation init; what is not an attention projection (gates, decays, slot routers) keeps
its fresh init.

One module per family reads its layout into one form (common.py); the student's modules lay that
form into their own parameters (their load_* methods), so neither side reaches into the other:

    llama.py    llama, mistral, qwen3 (the plain layout, common.TeacherFamily)
    qwen3_5.py  qwen3_5_text, qwen3_5_moe_text (gated attention, gated DeltaNet, softmax-routed MoE)
    glm4.py     glm4, glm4_moe (q/k/v biases, interleaved rotary, sandwich norms, grouped sigmoid MoE)

A MoE teacher's experts are carried over as they are (no --experts upcycling on top); its balancing
bias keeps moving under the student's moe_balancing rule once training starts.

Refused with a message naming the field: attention biases other than GLM's q/k/v ones, MLP biases,
rope scaling (only plain-theta RoPE is representable), sliding-window attention, activations other
than SiLU, GLM-4.5 groups of fewer than two experts, vision-language wrappers (their text model is
the teacher), and other families.
"""
from .families import SUPPORTED_FAMILIES, check_teacher
from .student import default_hybrid_layers, init_student, logit_gap, student_config

__all__ = ["SUPPORTED_FAMILIES", "check_teacher", "default_hybrid_layers", "init_student", "logit_gap",
           "student_config"]
