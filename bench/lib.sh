# Shared by bench/run.sh and bench/audit.sh.

# summarize NAME: reads lines "pg_tenancy baseline" (one per round) and prints the means and the
# median of the per-round ratios with their range. This machine's speed drifts by +-20% from
# one run to the next, so each round's ratio compares neighbours; the median is the figure.
summarize() {
    awk -v n="$1" '
        { p += $1; b += $2; r[NR] = $1 / $2 }
        END {
            for (i = 1; i <= NR; i++) for (j = i + 1; j <= NR; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
            med = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
            printf "%-34s %11.0f %11.0f %8.3f   [%.3f .. %.3f]\n", n, p / NR, b / NR, med, r[1], r[NR] }'
}
