"""Forgeline: an experiment-tracking pipeline for training and fine-tuning transformer models."""
