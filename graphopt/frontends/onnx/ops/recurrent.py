"""LSTM, GRU and RNN."""

from __future__ import annotations
