"""Teacher outputs: what the subnet's teacher says about a token stream, shared by both roles.

Distillation trains on them and the validator scores held-out KL against them, so their one
definition lives here, below `distill` and `eval`:

- `capture`: load a teacher and capture its top-k log-probs + tail mass (`load_teacher`,
  `capture_teacher_cache`);
- `cache`: the on-disk teacher cache format, named by its content (`open_teacher_cache`);
- `buckets`: the k+1-bucket KD divergence both roles compute on them;
- `tiny_teacher`: the project's own small teacher (localnet, tests, the "tiny-teacher" competition).

`TeacherCacheError` is defined here, not in `cache`, so a command line can catch it (one `error:`
line) without importing torch.
"""


class TeacherCacheError(Exception):
    """A teacher cache that cannot be used as asked: wrong tokenizer/k/vocab, damaged or missing files."""
