// Generated into check.gen.ts by tests/test_deploy.py: the dashboard JSON typed as Grafana's Dashboard.
import type { AnnotationQuery, Dashboard, DataQuery } from '@grafana/schema';

// The Prometheus data source's query model: Grafana's DataQuery plus PromQL fields.
interface PromQuery extends DataQuery {
  expr: string;
  interval?: string;
  legendFormat?: string;
  format?: 'time_series' | 'table' | 'heatmap';
  instant?: boolean;
}
type LoradDashboard = Omit<Dashboard, 'annotations'> & { annotations: { list: AnnotationQuery<PromQuery>[] } };

export const dashboard: LoradDashboard =
