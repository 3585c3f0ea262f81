"""Operators: window grouping and varlen 3D window attention (more ops join as they land)."""

from .window_attention import varlen_window_attention
from .window_groups import bias_table_size, relative_position_index, window_groups

__all__ = ["bias_table_size", "relative_position_index", "varlen_window_attention", "window_groups"]
