# -*- coding: utf-8 -*-

from mmfreelm.models.hgrn_bit import HGRNBitConfig, HGRNBitForCausalLM, HGRNBitModel
__all__ = [
    'HGRNBitConfig', 'HGRNBitForCausalLM', 'HGRNBitModel',

]
