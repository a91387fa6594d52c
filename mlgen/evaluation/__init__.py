"""Evaluation of generative models: ``mlgen.evaluation.digits`` scores digit samples."""
