"""What results become: ``cifarx report`` (a sweep, runs or an experiment as one HTML page
and Markdown) and ``cifarx reproduce`` (the assignment trained, attacked and reported).
"""
