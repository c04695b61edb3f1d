"""Measuring trained models: a student's similarity to its teacher on held-out audio
(``similarity``), keyword accuracy and speaker-verification EER / minDCF (``kws_sv``)."""
