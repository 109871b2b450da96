"""Images for every job: the embedded photos, synthetic scenes, unseen images, folders and the
``data:`` config section that picks one (:mod:`encoders.data.build`)."""
