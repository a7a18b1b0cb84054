-- Curvature, memorization and membership inference next to per-example epsilon.

-- curvature.curvature is the Hutchinson trace of the input Hessian of the point's loss;
-- score is the papers' saved curvature score (mean norm of the input-gradient difference).
ALTER TABLE curvature ADD COLUMN score DOUBLE;
ALTER TABLE curvature ADD COLUMN seed INTEGER;
