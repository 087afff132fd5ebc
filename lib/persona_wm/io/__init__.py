"""persona_wm.io"""
