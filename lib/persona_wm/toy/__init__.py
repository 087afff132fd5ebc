"""persona_wm.toy"""
