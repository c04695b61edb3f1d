"""fairseq-encoder plumbing that is no model class: frame arithmetic (``frames``), opening and
rebuilding checkpoints as encoders (``pretrained``) and reading every layer's hidden states
(``layers``). Imports torch and fairseq only, never another part of fairseq_kd."""
