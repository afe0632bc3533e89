"""Output folders: writing, atomic publishing, resume, verification, model card and Hub push."""
