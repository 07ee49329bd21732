"""Evaluation: the paper's protocol and its report, the video protocol, and the peers PPG is measured against."""
