"""persona_wm.core"""
