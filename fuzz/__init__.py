"""Fuzzing of every fastlstm loader with damaged copies of valid files: ``python -m fuzz`` (``make fuzz``).

``seeds`` lists the formats and writes a valid seed file of each; ``mutate`` damages them; ``worker`` loads
one file at a time in a memory- and time-limited child process; ``runner`` drives the worker, counts the
outcomes and minimises a repro of each distinct failure; ``report`` writes the JSON and Markdown summary.
"""
