"""persona_wm.llm"""
