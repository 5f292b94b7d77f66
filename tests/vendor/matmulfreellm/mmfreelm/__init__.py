# -*- coding: utf-8 -*-

from mmfreelm.models import (
                             HGRNBitForCausalLM,
                             HGRNBitModel)

__all__ = [
    'HGRNBitModel',
    'HGRNBitForCausalLM',
]

__version__ = '0.1'
