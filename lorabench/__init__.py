"""lorabench: measure what LoRA buys against full fine-tuning, cell by cell.

lorabench run        # the quick preset on the best device present
"""
