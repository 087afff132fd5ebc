"""persona_wm.plots"""
