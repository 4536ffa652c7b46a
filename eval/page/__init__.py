"""The comparison page of eval/demo.py: the models it compares and how one image is generated for each (models.py), and
the Gradio page itself (layout.py)."""
