"""persona_wm.analysis"""
